//! The VM state table: which single-hop transitions are allowed.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Starting,
    Running,
    Stopping,
    Stopped,
    Snapshotted,
    Error,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Snapshotted => "snapshotted",
            VmState::Error => "error",
        }
    }

    /// States that only exist while a VMM process does: after a daemon restart
    /// they cannot be true any more (seed 001 lists starting, running, stopping).
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

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "snapshotted" => VmState::Snapshotted,
            "error" => VmState::Error,
            other => return Err(format!("unknown VM state {other:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::*;
    use super::*;

    const ALL: [VmState; 6] = [Starting, Running, Stopping, Stopped, Snapshotted, Error];

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
        for s in ALL {
            assert!(!s.can_become(s), "{s} -> {s}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in ALL {
            assert_eq!(s.as_str().parse::<VmState>().unwrap(), s);
        }
        assert!("paused".parse::<VmState>().is_err());
    }

    #[test]
    fn transient_states_match_the_seed() {
        let transient: Vec<_> = ALL.into_iter().filter(|s| s.is_transient()).collect();
        assert_eq!(transient, vec![Starting, Running, Stopping]);
    }
}
