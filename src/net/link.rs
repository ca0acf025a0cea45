//! Links over netlink (rtnetlink): the bridge, its address, TAP devices.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

pub struct Netlink {
    handle: Handle,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

impl Netlink {
    pub fn connect() -> Result<Netlink, String> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| err("netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn get(&self, name: &str) -> Result<Option<LinkMessage>, String> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(err(&format!("looking up link {name}"), e)),
        }
    }

    pub async fn index_of(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(self.get(name).await?.map(|l| l.header.index))
    }

    /// Creates the bridge if it is missing, gives it `ip/prefix` if it does not
    /// have it, and brings it up. An existing bridge is reused as it is.
    pub async fn ensure_bridge(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> Result<u32, String> {
        if self.get(name).await?.is_none() {
            self.handle
                .link()
                .add(LinkBridge::new(name).up().build())
                .execute()
                .await
                .map_err(|e| err(&format!("creating bridge {name}"), e))?;
        }
        let index = self
            .index_of(name)
            .await?
            .ok_or_else(|| format!("bridge {name} vanished"))?;
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut has_ip = false;
        while let Some(a) = addrs
            .try_next()
            .await
            .map_err(|e| err("listing addresses", e))?
        {
            has_ip |= a.header.prefix_len == prefix
                && a.attributes
                    .iter()
                    .any(|at| matches!(at, AddressAttribute::Address(IpAddr::V4(v)) if *v == ip));
        }
        if !has_ip {
            self.handle
                .address()
                .add(index, IpAddr::V4(ip), prefix)
                .execute()
                .await
                .map_err(|e| err(&format!("adding {ip}/{prefix} to {name}"), e))?;
        }
        self.set_up(name, None).await?;
        Ok(index)
    }

    /// Brings `name` up, enslaved to the bridge `controller` when given.
    pub async fn set_up(&self, name: &str, controller: Option<u32>) -> Result<(), String> {
        let mut msg = LinkUnspec::new_with_name(name).up();
        if let Some(c) = controller {
            msg = msg.controller(c);
        }
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| err(&format!("setting {name} up"), e))
    }

    /// Creates a persistent TAP device (so the VMM can open it later by name,
    /// without privileges of its own), puts it in the bridge and brings it up.
    pub async fn create_tap(&self, name: &str, bridge_index: u32) -> Result<(), String> {
        if self.get(name).await?.is_none() {
            let n = name.to_string();
            tokio::task::spawn_blocking(move || make_persistent_tap(&n))
                .await
                .map_err(|e| e.to_string())??;
        }
        self.set_up(name, Some(bridge_index)).await
    }

    /// Deletes a link; a link that is not there is fine.
    pub async fn delete(&self, name: &str) -> Result<(), String> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(err(&format!("deleting {name}"), e)),
        }
    }

    /// Names of the links enslaved to `bridge_index`.
    pub async fn ports_of(&self, bridge_index: u32) -> Result<Vec<String>, String> {
        let mut links = self.handle.link().get().execute();
        let mut out = vec![];
        while let Some(l) = links
            .try_next()
            .await
            .map_err(|e| err("listing links", e))?
        {
            let in_bridge = l
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge_index));
            let name = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let (true, Some(n)) = (in_bridge, name) {
                out.push(n);
            }
        }
        Ok(out)
    }
}

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, padded to 40 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens the TAP `name` in the calling thread's network namespace, creating
/// it when it does not exist (as root), and returns the queue's file: frames
/// written to it are what the "guest" sends, frames read are what it receives.
/// This is what a VMM does when it opens a TAP by name.
pub fn open_tap(name: &str) -> Result<std::fs::File, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad TAP name {name:?}"));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| err("opening /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out
    // (repr(C), 40 bytes); the fd is open for the whole call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(err(
            &format!("creating TAP {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(tun)
}

/// A TUNSETIFF request for one TAP, made ready in a parent so that a forked
/// child (in the VM's network namespace, still privileged) can open the TAP
/// with system calls alone and hand the queue to an unprivileged VMM.
#[derive(Clone, Copy)]
pub struct TapRequest(IfReq);

impl TapRequest {
    pub fn new(name: &str) -> Result<TapRequest, String> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(format!("bad TAP name {name:?}"));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(TapRequest(req))
    }

    /// Opens a queue of the TAP in the calling thread's network namespace.
    ///
    /// # Safety
    /// Safe to call between fork and exec: system calls only, no allocation.
    pub unsafe fn open_raw(&self) -> std::io::Result<std::os::fd::RawFd> {
        let mut req = self.0;
        // SAFETY: a static NUL-terminated path; TUNSETIFF reads and writes a
        // `struct ifreq`, which `IfReq` lays out, on the fd just opened.
        unsafe {
            let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) < 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            Ok(fd)
        }
    }
}

/// Creates a TAP that outlives the file that made it, in the calling
/// thread's network namespace, so the VMM can open it later by name.
pub fn make_persistent_tap(name: &str) -> Result<(), String> {
    let tun = open_tap(name)?;
    // SAFETY: TUNSETPERSIST takes an integer argument by value; the fd is the TAP's.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(err(
            &format!("making TAP {name} persistent"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Writes a sysctl under /proc/sys.
pub fn sysctl(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("/proc/sys/{path}"), value)
        .map_err(|e| err(&format!("sysctl {path}={value}"), e))
}
