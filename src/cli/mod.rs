//! The `hatch` client commands: VMs, snapshots, images, templates and routes driven over the HTTP API.

mod client;
mod commands;
mod config;
mod openssh;
mod output;
mod progress;
mod resolve;
mod stream;
mod term;

pub use client::{CliError, Client};
pub use config::{Connection, Settings};

use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status for "the thing named does not exist" (a 404, or a name no
/// VM, snapshot, image, template or route has); scripts can tell it apart.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit status for every other failure (clap's usage errors are 2).
pub const EXIT_FAILURE: u8 = 1;

/// Options every client command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    #[command(flatten)]
    pub connection: Connection,
    /// Print the API's JSON exactly as it answered, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create and boot a VM.
    Create(VmCreate),
    /// List your VMs (newest first).
    #[command(alias = "list")]
    Ls,
    /// Show one VM.
    Show {
        /// VM name or id.
        vm: String,
    },
    /// Power a VM off (ACPI; killed after the server's stop timeout).
    Stop {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Boot a stopped (or failed) VM again from its disk.
    Start {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete VMs: their VMM, disk, snapshots and routes.
    #[command(alias = "delete")]
    Rm {
        /// VM names or ids.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Copy a file into or out of a VM (over SFTP, as the guest user
    /// `agent`): `hatch vm cp LOCAL VM:/path` or `hatch vm cp VM:/path LOCAL`.
    Cp {
        /// A local file, or `VM:/absolute/path` (VM name or id).
        src: String,
        /// A local file or directory, or `VM:/absolute/path`.
        dst: String,
        /// Upload only: the guest file's permission bits, in octal (`0600`);
        /// by default the local file's.
        #[arg(long, value_parser = parse_mode)]
        mode: Option<String>,
        /// Upload only: the guest file's numeric owner; by default `agent`.
        /// The guest decides: `agent` may give a file only its own uid.
        #[arg(long)]
        uid: Option<u32>,
        /// Upload only: the guest file's numeric group; by default
        /// `agent`'s. `agent` may give a file only a group it is in.
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Run a command in a VM as `agent` and print its output; exits with
    /// its exit code (`hatch vm exec web -- ls -l /`). With `-i` or `-t`
    /// it streams: stdin goes to the command as it is read, output comes
    /// back as it is written (`tar c . | hatch vm exec -i web -- tar x`,
    /// `hatch vm exec -t web -- top`).
    Exec {
        /// VM name or id.
        vm: String,
        /// Seconds before the command is killed (server default 60, at most 3600).
        #[arg(long)]
        timeout: Option<u64>,
        /// NAME=VALUE for the command's environment; repeat for several.
        #[arg(long = "env", short = 'e', value_parser = parse_tag)]
        env: Vec<(String, String)>,
        /// The directory to run in.
        #[arg(long)]
        cwd: Option<String>,
        /// Stream this program's standard input to the command, any size.
        #[arg(long, short = 'i')]
        stdin: bool,
        /// Run the command on a terminal in the VM, with this terminal in
        /// raw mode (keys, Ctrl-C included, go to the command); implies
        /// -i. Needs a terminal on stdin; `-tt` forces one in the VM anyway.
        #[arg(long, short = 't', action = clap::ArgAction::Count)]
        tty: u8,
        /// The command and its arguments, run as given (`-- sh -c '...'` for a shell line).
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// A login shell in a VM as `agent` on a terminal, over the API (as
    /// `vm exec -t`; no SSH key or port needed); with COMMAND, that shell
    /// line instead (words joined by spaces, as ssh does). Exits with the
    /// remote exit code.
    Ssh {
        /// VM name or id.
        vm: String,
        /// A terminal in the VM even with COMMAND (as ssh -t); `-tt` even
        /// when stdin is not a terminal.
        #[arg(short = 't', action = clap::ArgAction::Count)]
        tty: u8,
        /// No terminal in the VM, even for the login shell (as ssh -T).
        #[arg(short = 'T', conflicts_with = "tty")]
        no_tty: bool,
        /// Log in with your own OpenSSH client (`ssh`) instead, with a
        /// throw-away key and a short-lived certificate from the API: its
        /// forwarding, agent and config work. Needs the VM's SSH port reachable.
        #[arg(long)]
        openssh: bool,
        /// With --openssh: one more argument for ssh, placed before the
        /// host (`--ssh-arg=-L8080:localhost:80`); repeat for several.
        #[arg(long = "ssh-arg", requires = "openssh", allow_hyphen_values = true)]
        ssh_args: Vec<String>,
        /// A shell line to run instead of the login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Print a VM's serial console.
    Logs {
        /// VM name or id.
        vm: String,
        /// Keep printing new output until the VM's VMM exits.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Args, Debug)]
pub struct VmCreate {
    /// The VM's name (lowercase letters, digits, inner dashes; unique among yours).
    #[arg(long)]
    pub name: Option<String>,
    /// Image id or name (default: the template's, else img_default).
    #[arg(long)]
    pub image: Option<String>,
    /// Template id or name whose values fill in what is not given here.
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long)]
    pub vcpus: Option<i64>,
    /// Guest memory in MiB.
    #[arg(long)]
    pub mem_mib: Option<i64>,
    /// The kernel command line.
    #[arg(long)]
    pub boot_args: Option<String>,
    /// No IP, TAP or SSH forward.
    #[arg(long)]
    pub no_network: bool,
    /// Cloud-init user data or a `#!` script.
    #[arg(long, conflicts_with = "user_data_file")]
    pub user_data: Option<String>,
    /// Read the user data from this file (`-`: standard input).
    #[arg(long)]
    pub user_data_file: Option<PathBuf>,
    /// The hypervisor, by the name the API uses (default: the server's).
    #[arg(long)]
    pub hypervisor: Option<String>,
    /// Its own idle timeout in seconds (idle sleep).
    #[arg(long)]
    pub idle_timeout: Option<i64>,
    /// Opt out of idle sleep.
    #[arg(long)]
    pub no_auto_sleep: bool,
    #[command(flatten)]
    pub wait: Wait,
}

/// `--wait`: stay until the work is done, with a spinner on a terminal.
#[derive(Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Wait until the VM (or snapshot) has settled, showing progress on a terminal.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SnapshotKind {
    /// The Hatch snapshot: memory, CPU state and disk; the VM goes to sleep
    /// (`snapshotted`) and a restore or a proxied request wakes it.
    Sleep,
    /// A Hypeman Standby checkpoint: the VM is paused, captured and resumed.
    Standby,
    /// A Hypeman Stopped snapshot: the guest is powered off, only its disk is kept.
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetState {
    Running,
    Standby,
    Stopped,
}

impl TargetState {
    fn api_name(self) -> &'static str {
        match self {
            TargetState::Running => "Running",
            TargetState::Standby => "Standby",
            TargetState::Stopped => "Stopped",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a VM. By default the VM goes to sleep on it (the Hatch
    /// snapshot); `--kind standby|stopped` makes a Hypeman snapshot.
    Create {
        /// VM name or id.
        vm: String,
        #[arg(long, value_enum, default_value_t = SnapshotKind::Sleep)]
        kind: SnapshotKind,
        /// Snapshot name (Hypeman kinds only).
        #[arg(long)]
        name: Option<String>,
        /// A tag KEY=VALUE (Hypeman kinds only); repeat for several.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Memory compression: `none`, `zstd`, `zstd:LEVEL`, `lz4`, `lz4:LEVEL` (standby only).
        #[arg(long)]
        compression: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// List your snapshots (newest first), optionally filtered.
    #[command(alias = "list")]
    Ls {
        /// Only this VM's (id or name).
        #[arg(long)]
        vm: Option<String>,
        /// `Standby` or `Stopped`.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// KEY=VALUE; repeat for several (all must match).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Show one snapshot (id, or a name unique among your snapshots).
    Show {
        /// Snapshot id or name.
        snapshot: String,
    },
    /// Delete snapshots and their objects.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Restore a VM: without SNAPSHOT it wakes from the snapshot it sleeps
    /// on; with one, it takes that snapshot's state (Hypeman restore).
    Restore {
        /// VM name or id.
        vm: String,
        /// One of the VM's snapshots (id or name).
        snapshot: Option<String>,
        #[arg(long, value_enum)]
        target_state: Option<TargetState>,
        /// Move the VM to this hypervisor (Stopped snapshots only).
        #[arg(long)]
        target_hypervisor: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// A new VM from a snapshot.
    Fork {
        /// Snapshot id or name.
        snapshot: String,
        /// The new VM's name.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        target_state: Option<TargetState>,
        #[arg(long)]
        target_hypervisor: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ImageKind {
    Busybox,
    Debian,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build a guest image into DIR (DIR/vmlinuz, DIR/vmlinux, DIR/initrd.img,
    /// DIR/rootfs.ext4). Local: needs no daemon.
    Build {
        #[arg(long)]
        out: PathBuf,
        /// `busybox`: the small default image (seconds to build and boot);
        /// `debian`: Debian bookworm with systemd, cloud-init and OpenSSH (debootstrap).
        #[arg(long, value_enum, default_value_t = ImageKind::Busybox)]
        kind: ImageKind,
    },
    /// List the images you can boot (yours and img_default).
    #[command(alias = "list")]
    Ls,
    /// Show one image.
    Show { image: String },
    /// Delete images.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Upload an image's files to the daemon (or, with --import, name files
    /// on the daemon's host inside HATCH_IMAGE_IMPORT_DIRS).
    Create {
        /// The kernel: an x86 bzImage or ELF vmlinux.
        #[arg(long)]
        kernel: PathBuf,
        /// The root disk: ext4, or qcow2 without a backing file.
        #[arg(long)]
        rootfs: PathBuf,
        /// An ELF vmlinux beside a bzImage kernel (for a VMM that boots only ELF).
        #[arg(long)]
        kernel_elf: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        boot_args: Option<String>,
        /// The paths are on the daemon's host: import them instead of uploading.
        #[arg(long)]
        import: bool,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Create a template: defaults for `vm create --template`.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Image id or name.
        #[arg(long)]
        image: Option<String>,
        #[arg(long, conflicts_with = "user_data_file")]
        user_data: Option<String>,
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        #[arg(long)]
        vcpus: Option<i64>,
        #[arg(long)]
        mem_mib: Option<i64>,
    },
    /// List your templates.
    #[command(alias = "list")]
    Ls,
    /// Show one template.
    Show { template: String },
    /// Delete templates.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        templates: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RouteCmd {
    /// A VM's proxy routes.
    #[command(alias = "list")]
    Ls {
        /// VM name or id.
        vm: String,
    },
    /// Expose a VM's port as SUBDOMAIN.BASE_DOMAIN through the proxy.
    Add {
        /// VM name or id.
        vm: String,
        /// The guest's port.
        #[arg(long)]
        port: i64,
        /// Random when not given.
        #[arg(long)]
        subdomain: Option<String>,
        /// Answer 503 instead of waking the VM when it sleeps.
        #[arg(long)]
        no_auto_wake: bool,
    },
    /// Delete a route (its id or subdomain).
    #[command(alias = "delete")]
    Rm {
        /// VM name or id.
        vm: String,
        /// Route id or subdomain.
        route: String,
    },
}

/// Permission bits as the files API takes them (the daemon's own check):
/// one to four octal digits.
fn parse_mode(s: &str) -> Result<String, String> {
    crate::manager::files::parse_mode(s)
        .map(|_| s.to_string())
        .map_err(|_| format!("{s:?} is not a mode: one to four octal digits, such as 0644"))
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A client command, as `main` hands it over.
#[derive(Debug)]
pub enum Command {
    Vm(VmCmd),
    Snapshot(SnapshotCmd),
    Image(ImageCmd),
    Template(TemplateCmd),
    Route(RouteCmd),
}

/// Runs one client command and turns its outcome into the exit status
/// (the error on stderr).
pub fn run(global: Global, cmd: Command) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Other(format!("starting the runtime: {e}")))
        .and_then(|rt| rt.block_on(commands::run(global, cmd)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
