//! Templates: saved VM settings an owner creates VMs from.

use super::{not_found, Manager, ManagerError, Result};
use crate::ids;
use crate::store::{self, Owner, Template};

use super::requests::CreateTemplate;

impl Manager {
    pub async fn create_template(&self, owner: &Owner, req: CreateTemplate) -> Result<Template> {
        req.validate().map_err(ManagerError::BadRequest)?;
        // Held until the template row is in: a delete of the image waits, then sees it used.
        let _image_hold = match &req.image_id {
            Some(img) => Some(self.hold_image(owner, img).await.map_err(|_| {
                ManagerError::BadRequest(format!("image_id: image {img} not found"))
            })?),
            None => None,
        };
        let now = store::now();
        let t = Template {
            id: ids::new_id("tpl"),
            owner_id: owner.id.clone(),
            name: req.name.unwrap_or_default(),
            description: req.description,
            image_id: req.image_id,
            user_data: req.user_data,
            vcpu_count: req.vcpu_count,
            mem_mib: req.mem_mib,
            created_at: now.clone(),
            updated_at: now,
        };
        self.store.insert_template(&t).await?;
        Ok(t)
    }

    pub async fn get_template(&self, owner: &Owner, id: &str) -> Result<Template> {
        self.store
            .get_template(&owner.id, id)
            .await?
            .ok_or_else(|| not_found("template", id))
    }

    pub async fn list_templates(&self, owner: &Owner) -> Result<Vec<Template>> {
        Ok(self.store.list_templates(&owner.id).await?)
    }

    /// One page of the owner's templates, newest first.
    pub async fn list_templates_page(
        &self,
        owner: &Owner,
        page: &store::Page,
    ) -> Result<Vec<store::Listed<Template>>> {
        Ok(self.store.list_templates_page(&owner.id, page).await?)
    }

    pub async fn delete_template(&self, owner: &Owner, id: &str) -> Result<()> {
        if self.store.delete_template(&owner.id, id).await? {
            Ok(())
        } else {
            Err(not_found("template", id))
        }
    }
}
