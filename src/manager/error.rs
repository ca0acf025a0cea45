//! The domain error: what went wrong, with its typed source, and which kind of failure it is for whoever asked.

use crate::snapshot::ObjectError;
use crate::store::StoreError;
use crate::vmm::VmmError;

/// The failures a caller tells apart (the API gives each its status code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Conflict,
    /// Allowed in principle, refused by a limit (a quota).
    Forbidden,
    /// A request body or upload over its size limit.
    TooLarge,
    /// The host cannot take it now (its memory is fully given out).
    Unavailable,
    /// The guest's own service (its SSH server) failed the daemon.
    BadGateway,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Allowed in principle, refused by a limit (a quota, the host's capacity).
    #[error("{0}")]
    Forbidden(String),
    /// A request body or upload over its size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The host cannot take it now (its memory is fully given out).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The guest's SSH server could not be reached or failed the session.
    #[error("{0}")]
    Guest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Objects(#[from] ObjectError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// A failure of the host's networking or image tools (src/net and
    /// src/image report theirs as text).
    #[error("{0}")]
    Host(String),
    /// A step of a flow failed: what was being done, and why.
    #[error("{context}: {source}")]
    Step {
        context: String,
        #[source]
        source: Box<ManagerError>,
    },
}

pub type Result<T> = std::result::Result<T, ManagerError>;

impl ManagerError {
    /// Which kind of failure this is for the caller. A failed step is the
    /// daemon's failure whatever its cause: the flow was admitted already.
    pub fn kind(&self) -> ErrorKind {
        use ManagerError::*;
        match self {
            BadRequest(_) => ErrorKind::BadRequest,
            NotFound(_) => ErrorKind::NotFound,
            Conflict(_) | Store(StoreError::Conflict(_)) => ErrorKind::Conflict,
            Forbidden(_) => ErrorKind::Forbidden,
            TooLarge(_) => ErrorKind::TooLarge,
            Unavailable(_) => ErrorKind::Unavailable,
            Guest(_) => ErrorKind::BadGateway,
            Internal(_)
            | Store(_)
            | Objects(_)
            | Vmm(_)
            | Io(_)
            | Task(_)
            | Host(_)
            | Step { .. } => ErrorKind::Internal,
        }
    }

    /// This error as the cause of the step `context`.
    pub fn context(self, context: impl Into<String>) -> ManagerError {
        ManagerError::Step {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The object store's error at the root of this one, if that is what it is.
    pub fn object_error(&self) -> Option<&ObjectError> {
        match self {
            ManagerError::Objects(e) => Some(e),
            ManagerError::Step { source, .. } => source.object_error(),
            _ => None,
        }
    }
}

/// `.context(|| ...)` on any result whose error becomes a `ManagerError`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<ManagerError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_reads_as_before_and_keeps_its_typed_cause() {
        let missing = ObjectError::Missing("snapshots/vm_1/snap_1/disk".into());
        let e: Result<()> = Err(missing).context(|| "restoring instance vm_1".into());
        let e = e.unwrap_err();
        assert_eq!(
            e.to_string(),
            "restoring instance vm_1: object snapshots/vm_1/snap_1/disk is missing from the snapshot store"
        );
        assert!(matches!(e.object_error(), Some(ObjectError::Missing(_))));
        assert_eq!(e.kind(), ErrorKind::Internal);
    }

    #[test]
    fn store_conflicts_stay_conflicts() {
        let e = ManagerError::from(StoreError::Conflict("taken".into()));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Conflict, "taken")
        );
        let e = ManagerError::Store(StoreError::Transition {
            what: "snapshot",
            id: "snap_1".into(),
            from: "ready".into(),
            to: "capturing".into(),
        });
        assert_eq!(e.kind(), ErrorKind::Internal);
    }
}
