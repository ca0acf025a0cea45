//! The typed vocabulary of the core: VM and snapshot states with their state tables, snapshot kinds, MAC addresses and JSON columns, each converted once at the store boundary.
//!
//! Every type here is stored as TEXT with exactly the strings earlier
//! versions wrote, so old databases read back unchanged.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::sqlite::{Sqlite, SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Type, ValueRef};
use std::borrow::Cow;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A state the store holds as a TEXT name; `FALLBACK` is what unknown text
/// (a newer daemon's state, a hand edit) is read as.
trait TextState: Sized + Copy + 'static {
    const ALL: &'static [Self];
    const FALLBACK: Self;
    fn as_str(self) -> &'static str;
}

/// Declares a TEXT enum: its names, `Display`/`FromStr`, and sqlx's
/// `Type`/`Encode`/`Decode` for SQLite. Not `#[derive(sqlx::Type)]`: that
/// refuses unknown text, and a row must still be readable (see `FALLBACK`).
macro_rules! text_enum {
    ($ty:ident, $what:literal, fallback $fallback:ident, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl TextState for $ty {
            const ALL: &'static [Self] = &[$($ty::$variant),+];
            const FALLBACK: Self = $ty::$fallback;
            fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl $ty {
            pub fn as_str(self) -> &'static str {
                TextState::as_str(self)
            }

            /// Every value, in declaration order.
            pub fn all() -> &'static [Self] {
                <Self as TextState>::ALL
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!(concat!("unknown ", $what, " {:?}"), other)),
                }
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl Type<Sqlite> for $ty {
            fn type_info() -> SqliteTypeInfo {
                <str as Type<Sqlite>>::type_info()
            }
        }

        impl<'q> Encode<'q, Sqlite> for $ty {
            fn encode_by_ref(
                &self,
                args: &mut Vec<SqliteArgumentValue<'q>>,
            ) -> Result<IsNull, BoxDynError> {
                args.push(SqliteArgumentValue::Text(Cow::Borrowed(self.as_str())));
                Ok(IsNull::No)
            }
        }

        impl $ty {
            /// The value a stored name stands for (unknown text reads as the fallback).
            pub fn from_stored(text: &str) -> Self {
                text.parse().unwrap_or(<Self as TextState>::FALLBACK)
            }
        }

        impl<'r> Decode<'r, Sqlite> for $ty {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok(Self::from_stored(<&str as Decode<Sqlite>>::decode(value)?))
            }
        }
    };
}

/// A VM's state (Hatch API); src/manager/README.md, "Why a state table?", explains the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum VmState {
    Starting,
    Running,
    Stopping,
    Stopped,
    Snapshotted,
    Error,
}

// Unknown text is an error state, never running: nothing would supervise it.
text_enum!(VmState, "VM state", fallback Error, {
    Starting => "starting",
    Running => "running",
    Stopping => "stopping",
    Stopped => "stopped",
    Snapshotted => "snapshotted",
    Error => "error",
});

impl VmState {
    /// States that only exist while a VMM process does: after a daemon restart
    /// they cannot be true any more (the Hatch API lists starting, running, stopping).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Stopping
        )
    }

    /// May the VM go from `self` to `to` in one step?
    pub fn can_become(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Starting, Running)
                | (Starting, Error)
                | (Running, Stopping)
                | (Running, Stopped)
                | (Running, Error)
                | (Running, Snapshotted)
                | (Stopping, Stopped)
                | (Stopping, Error)
                | (Stopped, Starting)
                | (Error, Starting)
                | (Snapshotted, Starting)
                | (Starting, Snapshotted)
                | (Snapshotted, Error)
                // A restore or fork that only puts a disk (or a standby) in place.
                | (Starting, Stopped)
                | (Stopped, Snapshotted)
                | (Error, Snapshotted)
                | (Snapshotted, Stopped)
                | (Error, Stopped)
        ) || (to == Error && self.is_transient())
    }
}

/// Whether a snapshot can be used: `capturing` until every object is stored
/// and checksummed, then `ready`. Only `ready` rows are listed or restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    Capturing,
    Ready,
}

// Unknown text is never usable: start-up removes it like a cut-short capture.
text_enum!(SnapshotStatus, "snapshot status", fallback Capturing, {
    Capturing => "capturing",
    Ready => "ready",
});

impl SnapshotStatus {
    /// May a snapshot go from `self` to `to`? Only forward: a ready snapshot
    /// never becomes unusable again (it is deleted instead).
    pub fn can_become(self, to: SnapshotStatus) -> bool {
        matches!(
            (self, to),
            (SnapshotStatus::Capturing, SnapshotStatus::Ready)
        )
    }
}

/// Where background compression of a snapshot's memory is (the Hypeman API's
/// `compression_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum CompressionState {
    /// Not asked for (or a Stopped snapshot, which has no memory).
    None,
    Compressing,
    /// The memory lives in `compressed_key`; the raw object is gone.
    Compressed,
    /// Compression failed; the raw memory stays and is what restores use.
    Error,
}

// Unknown text: the raw memory is used, as for a failed compression.
text_enum!(CompressionState, "compression state", fallback Error, {
    None => "none",
    Compressing => "compressing",
    Compressed => "compressed",
    Error => "error",
});

impl CompressionState {
    /// May compression go from `self` to `to` in one step? `None ->
    /// Compressed` is a copy of an already compressed snapshot (a fork kept
    /// in standby); a finished or failed compression is final.
    pub fn can_become(self, to: CompressionState) -> bool {
        use CompressionState::*;
        matches!(
            (self, to),
            (None, Compressing)
                | (None, Compressed)
                | (Compressing, Compressed)
                | (Compressing, Error)
        )
    }
}

/// The Hypeman API's snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
pub enum SnapshotKind {
    /// Memory, CPU/device state and disk; the instance goes to standby.
    Standby,
    /// Disk only; the guest is shut down first.
    Stopped,
}

// Unknown text: Standby, as earlier versions read it.
text_enum!(SnapshotKind, "snapshot kind", fallback Standby, {
    Standby => "Standby",
    Stopped => "Stopped",
});

impl SnapshotKind {
    /// Parses a request's `kind`, with the API's message.
    pub fn parse(s: &str) -> Result<SnapshotKind, String> {
        s.parse()
            .map_err(|_| format!("kind must be Standby or Stopped, got {s:?}"))
    }
}

/// A MAC address, shown (and stored) as lowercase `02:fc:00:00:00:0a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Six colon-separated hex pairs, either case. Whether a MAC may be a
/// guest's (unicast, non-zero) is the request validation's question.
impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().filter(|p| p.len() == 2);
            *byte = part
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Type<Sqlite> for MacAddr {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for MacAddr {
    fn encode_by_ref(
        &self,
        args: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        args.push(SqliteArgumentValue::Text(Cow::Owned(self.to_string())));
        Ok(IsNull::No)
    }
}

impl<'r> Decode<'r, Sqlite> for MacAddr {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(<&str as Decode<Sqlite>>::decode(value)?.parse()?)
    }
}

/// A nullable TEXT column holding an IPv4 address, read into an
/// `Option<Ipv4Addr>` field with `#[sqlx(try_from = "StoredIp")]` (sqlx has
/// no SQLite type for `Ipv4Addr`, and the orphan rule forbids adding one).
pub struct StoredIp(Option<Ipv4Addr>);

impl From<StoredIp> for Option<Ipv4Addr> {
    fn from(ip: StoredIp) -> Self {
        ip.0
    }
}

impl Type<Sqlite> for StoredIp {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }
}

impl<'r> Decode<'r, Sqlite> for StoredIp {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        if value.is_null() {
            return Ok(StoredIp(None));
        }
        Ok(StoredIp(Some(
            <&str as Decode<Sqlite>>::decode(value)?.parse()?,
        )))
    }
}

/// How an `Option<Ipv4Addr>` is bound: as the dotted text earlier versions stored.
pub fn ip_text(ip: Option<Ipv4Addr>) -> Option<String> {
    ip.map(|i| i.to_string())
}

/// A TEXT column holding JSON, parsed once when the row is read and written
/// back compact.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Json<T>(pub T);

impl<T> std::ops::Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Json<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T> Type<Sqlite> for Json<T> {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }
}

impl<'q, T: Serialize> Encode<'q, Sqlite> for Json<T> {
    fn encode_by_ref(
        &self,
        args: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        args.push(SqliteArgumentValue::Text(Cow::Owned(
            serde_json::to_string(&self.0)?,
        )));
        Ok(IsNull::No)
    }
}

impl<'r, T: DeserializeOwned> Decode<'r, Sqlite> for Json<T> {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Json(serde_json::from_str(
            <&str as Decode<Sqlite>>::decode(value)?,
        )?))
    }
}

/// A snapshot's tags (Hypeman API): string keys and values, shown as a JSON object.
pub type Tags = std::collections::BTreeMap<String, String>;

/// The VM as a snapshot recorded it (the Hatch API's `vm_config`): what a fork
/// or restore of it inherits, and the address its guest memory holds. The
/// fields are in alphabetical order so the stored (and shown) text is what
/// earlier versions wrote with sorted keys; every field may be absent in a
/// row from an older version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub boot_args: Option<String>,
    pub enable_network: Option<bool>,
    pub guest_ip: Option<Ipv4Addr>,
    pub guest_mac: Option<MacAddr>,
    /// The SSH principal the guest's memory trusts (its VM's id, or for a
    /// fork not yet told its own, the id it was forked from). Left out when
    /// absent, so older rows read and write back as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_principal: Option<String>,
    pub image_id: Option<String>,
    /// The address in the guest's memory (differs from guest_ip for a fork).
    pub inner_ip: Option<Ipv4Addr>,
    pub inner_mac: Option<MacAddr>,
    pub mem_mib: Option<i64>,
    pub name: Option<String>,
    pub user_data: Option<String>,
    pub vcpu_count: Option<i64>,
}

impl VmConfig {
    /// The address and MAC the snapshot's guest memory holds.
    pub fn memory_address(&self) -> (Option<Ipv4Addr>, Option<MacAddr>) {
        (
            self.inner_ip.or(self.guest_ip),
            self.inner_mac.or(self.guest_mac),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::*;
    use super::*;

    #[test]
    fn lifecycle_paths_are_allowed() {
        assert!(Starting.can_become(Running));
        assert!(Running.can_become(Stopping));
        assert!(Stopping.can_become(Stopped));
        assert!(Stopped.can_become(Starting));
        assert!(Error.can_become(Starting));
        assert!(Running.can_become(Stopped), "a guest may power itself off");
    }

    #[test]
    fn shortcuts_are_refused() {
        assert!(!Stopped.can_become(Running), "start goes through starting");
        assert!(!Stopped.can_become(Stopping));
        assert!(!Running.can_become(Starting));
        assert!(!Error.can_become(Running));
        for s in VmState::all() {
            assert!(!s.can_become(*s), "{s} -> {s}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in VmState::all() {
            assert_eq!(s.as_str().parse::<VmState>().unwrap(), *s);
        }
        assert!("paused".parse::<VmState>().is_err());
        for s in SnapshotStatus::all() {
            assert_eq!(s.as_str().parse::<SnapshotStatus>().unwrap(), *s);
        }
        for s in CompressionState::all() {
            assert_eq!(s.as_str().parse::<CompressionState>().unwrap(), *s);
        }
        for k in SnapshotKind::all() {
            assert_eq!(SnapshotKind::parse(k.as_str()).unwrap(), *k);
        }
        assert_eq!(
            SnapshotKind::parse("standby").unwrap_err(),
            "kind must be Standby or Stopped, got \"standby\""
        );
    }

    #[test]
    fn transient_states_match_the_hatch_api() {
        let transient: Vec<_> = VmState::all()
            .iter()
            .copied()
            .filter(|s| s.is_transient())
            .collect();
        assert_eq!(transient, vec![Starting, Running, Stopping]);
    }

    #[test]
    fn a_snapshot_only_becomes_ready_once() {
        use SnapshotStatus::*;
        assert!(Capturing.can_become(Ready));
        assert!(
            !Ready.can_become(Capturing),
            "a ready snapshot stays usable"
        );
        assert!(!Ready.can_become(Ready));
        assert!(!Capturing.can_become(Capturing));
    }

    #[test]
    fn compression_moves_forward_and_ends() {
        use CompressionState::*;
        let allowed = [
            (None, Compressing),
            (None, Compressed),
            (Compressing, Compressed),
            (Compressing, Error),
        ];
        for from in CompressionState::all() {
            for to in CompressionState::all() {
                assert_eq!(
                    from.can_become(*to),
                    allowed.contains(&(*from, *to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn macs_parse_and_show_lowercase() {
        let mac: MacAddr = "02:FC:00:0a:Bb:ff".parse().unwrap();
        assert_eq!(mac.octets(), [0x02, 0xfc, 0x00, 0x0a, 0xbb, 0xff]);
        assert_eq!(mac.to_string(), "02:fc:00:0a:bb:ff");
        for bad in [
            "",
            "02:fc:00:00:00",
            "02:fc:00:00:00:00:00",
            "02:fc:0:00:00:00",
            "zz:fc:00:00:00:00",
            "02-fc-00-00-00-00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"02:fc:00:0a:bb:ff\""
        );
        assert_eq!(
            serde_json::from_str::<MacAddr>("\"02:fc:00:0a:bb:ff\"").unwrap(),
            mac
        );
    }
}
