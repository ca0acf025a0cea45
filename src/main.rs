//! The `hatch` binary: `hatch serve` runs the daemon; `vm`, `snapshot`,
//! `image`, `template` and `route` are clients of its API (src/cli); `keys`,
//! `owners` and `image build` work on this host directly.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use hatch::api::{self, AppState};
use hatch::cli::{self, ImageCmd, ImageKind};
use hatch::config::Config;
use hatch::manager::Manager;
use hatch::store::{self, ApiKey, Store};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "hatch", version, about = "Self-hosted microVM control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (configured through HATCH_* environment variables).
    Serve,
    /// Manage API keys (works on HATCH_DATA_DIR directly).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Owners: their limits (works on HATCH_DATA_DIR directly).
    Owners {
        #[command(subcommand)]
        cmd: OwnersCmd,
    },
    /// VMs: create, list, show, stop, start, delete, console logs (over the API).
    Vm {
        #[command(flatten)]
        global: cli::Global,
        #[command(subcommand)]
        cmd: cli::VmCmd,
    },
    /// Snapshots: create, list, show, delete, restore, fork (over the API).
    Snapshot {
        #[command(flatten)]
        global: cli::Global,
        #[command(subcommand)]
        cmd: cli::SnapshotCmd,
    },
    /// Images: build one here, or list, show, upload and delete them (over the API).
    Image {
        // Ignored by `image build`, which is local.
        #[command(flatten)]
        global: cli::Global,
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Templates: defaults for `vm create` (over the API).
    Template {
        #[command(flatten)]
        global: cli::Global,
        #[command(subcommand)]
        cmd: cli::TemplateCmd,
    },
    /// A VM's proxy routes (over the API).
    Route {
        #[command(flatten)]
        global: cli::Global,
        #[command(subcommand)]
        cmd: cli::RouteCmd,
    },
    /// Print a shell completion script: `hatch completions bash > /etc/bash_completion.d/hatch`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create an API key, for a new owner (--name) or an existing one (--owner).
    /// The key is printed once, as the last line of standard output.
    Create {
        /// Name of a new owner to create.
        #[arg(long, conflicts_with = "owner", required_unless_present = "owner")]
        name: Option<String>,
        /// Existing owner (id or name) that gets another key.
        #[arg(long)]
        owner: Option<String>,
        /// A label for the key itself.
        #[arg(long, default_value = "default")]
        label: String,
    },
    /// List keys (never the keys themselves, only their prefixes).
    List,
    /// Revoke a key by its id (`key_...`).
    Revoke { id: String },
}

#[derive(Subcommand)]
enum OwnersCmd {
    /// Show an owner's limits and use; with options, set them first. Each
    /// takes a number or `default` (the server's HATCH_QUOTA_* value).
    Limits {
        /// Owner id or name.
        owner: String,
        #[arg(long, value_parser = parse_limit)]
        vms: Option<Limit>,
        #[arg(long, value_parser = parse_limit)]
        vcpus: Option<Limit>,
        #[arg(long, value_parser = parse_limit)]
        mem_mib: Option<Limit>,
        #[arg(long, value_parser = parse_limit)]
        snapshots_per_vm: Option<Limit>,
        /// Bytes, or with a suffix: 500M, 20G, 1T.
        #[arg(long, value_parser = parse_size_limit)]
        stored_bytes: Option<Limit>,
    },
}

/// One limit given on the command line: a value of the owner's own, or back
/// to the server's default.
#[derive(Clone, Copy, Debug)]
enum Limit {
    Default,
    Own(i64),
}

impl Limit {
    fn apply(this: Option<Limit>, field: &mut Option<i64>) {
        match this {
            Some(Limit::Default) => *field = None,
            Some(Limit::Own(v)) => *field = Some(v),
            None => {}
        }
    }
}

fn parse_limit(s: &str) -> Result<Limit, String> {
    match s {
        "default" => Ok(Limit::Default),
        _ => s
            .parse::<u32>()
            .map(|v| Limit::Own(v.into()))
            .map_err(|_| format!("{s:?} is not a whole number (or `default`)")),
    }
}

fn parse_size_limit(s: &str) -> Result<Limit, String> {
    match s {
        "default" => Ok(Limit::Default),
        _ => {
            let v = hatch::config::parse_size(s)?;
            i64::try_from(v)
                .map(Limit::Own)
                .map_err(|_| format!("{s:?} is too large"))
        }
    }
}

fn main() -> ExitCode {
    // Everything the daemon and its tools create is theirs alone: files
    // 0600, directories 0700 (the data dir holds every owner's data).
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let local = match Cli::parse().cmd {
        Cmd::Image {
            cmd: ImageCmd::Build { out, kind },
            ..
        } => match kind {
            ImageKind::Busybox => hatch::image::build::build(&out),
            ImageKind::Debian => hatch::image::debian::build(&out),
        },
        Cmd::Serve => runtime().and_then(|rt| rt.block_on(serve())),
        Cmd::Keys { cmd } => runtime().and_then(|rt| rt.block_on(keys(cmd))),
        Cmd::Owners { cmd } => runtime().and_then(|rt| rt.block_on(owners(cmd))),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "hatch", &mut std::io::stdout());
            Ok(())
        }
        // The API's clients: they exit with their own status (3: not found).
        Cmd::Vm { global, cmd } => return cli::run(global, cli::Command::Vm(cmd)),
        Cmd::Snapshot { global, cmd } => return cli::run(global, cli::Command::Snapshot(cmd)),
        Cmd::Image { global, cmd } => return cli::run(global, cli::Command::Image(cmd)),
        Cmd::Template { global, cmd } => return cli::run(global, cli::Command::Template(cmd)),
        Cmd::Route { global, cmd } => return cli::run(global, cli::Command::Route(cmd)),
    };
    match local {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // As `fn main() -> anyhow::Result` printed it before.
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn config() -> anyhow::Result<Config> {
    Config::from_env().map_err(|e| anyhow::anyhow!(e))
}

async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    Store::open(&cfg.db_path())
        .await
        .context("opening the database")
}

async fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    let cfg = config()?;
    let store = open_store(&cfg).await?;
    match cmd {
        KeysCmd::Create { name, owner, label } => {
            let owner = match (name, owner) {
                (Some(name), _) => {
                    let name = name.trim();
                    anyhow::ensure!(!name.is_empty(), "--name must not be empty");
                    store
                        .create_owner(&hatch::ids::new_id("own"), name)
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!("{e} (use --owner {name} to add a key to it)")
                        })?
                }
                (None, Some(o)) => store
                    .find_owner(&o)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no owner {o:?}; create one with --name"))?,
                (None, None) => unreachable!("clap requires one of them"),
            };
            let key = api::new_key();
            let record = ApiKey {
                id: hatch::ids::new_id("key"),
                owner_id: owner.id.clone(),
                name: label,
                prefix: key[..7].to_string(),
                created_at: store::now(),
                revoked_at: None,
            };
            store.insert_api_key(&record, &api::hash_key(&key)).await?;
            if cfg.auth.better_auth.is_some() {
                eprintln!("note: HATCH_BETTER_AUTH_VERIFY_URL is set, so the daemon accepts only Better Auth keys, not this one");
            }
            println!(
                "created key {} for owner {} ({})",
                record.id, owner.name, owner.id
            );
            println!("{key}");
        }
        KeysCmd::List => {
            println!(
                "{:<18} {:<20} {:<12} {:<10} {:<22} REVOKED",
                "ID", "OWNER", "LABEL", "PREFIX", "CREATED"
            );
            for (k, owner) in store.list_api_keys().await? {
                println!(
                    "{:<18} {:<20} {:<12} {:<10} {:<22} {}",
                    k.id,
                    owner,
                    k.name,
                    k.prefix,
                    k.created_at,
                    k.revoked_at.as_deref().unwrap_or("-")
                );
            }
        }
        KeysCmd::Revoke { id } => {
            anyhow::ensure!(store.revoke_api_key(&id).await?, "no live key {id:?}");
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn owners(cmd: OwnersCmd) -> anyhow::Result<()> {
    let cfg = config()?;
    let store = open_store(&cfg).await?;
    match cmd {
        OwnersCmd::Limits {
            owner,
            vms,
            vcpus,
            mem_mib,
            snapshots_per_vm,
            stored_bytes,
        } => {
            let owner = store
                .find_owner(&owner)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no owner {owner:?}"))?;
            let mut own = store.owner_limits(&owner.id).await?;
            let changes = [vms, vcpus, mem_mib, snapshots_per_vm, stored_bytes];
            if changes.iter().any(Option::is_some) {
                Limit::apply(vms, &mut own.vms);
                Limit::apply(vcpus, &mut own.vcpus);
                Limit::apply(mem_mib, &mut own.mem_mib);
                Limit::apply(snapshots_per_vm, &mut own.snapshots_per_vm);
                Limit::apply(stored_bytes, &mut own.stored_bytes);
                store.set_owner_limits(&owner.id, &own).await?;
            }
            let limits = hatch::manager::quotas::effective(&cfg.limits.quota, &own);
            let usage = store.owner_usage(&owner.id).await?;
            println!("limits of owner {} ({})", owner.name, owner.id);
            println!("{:<18} {:>14} {:>14}  SOURCE", "LIMIT", "VALUE", "IN USE");
            let rows = [
                ("vms", limits.vms, own.vms, usage.vms.to_string()),
                ("vcpus", limits.vcpus, own.vcpus, usage.vcpus.to_string()),
                (
                    "mem_mib",
                    limits.mem_mib,
                    own.mem_mib,
                    usage.mem_mib.to_string(),
                ),
                (
                    "snapshots_per_vm",
                    limits.snapshots_per_vm,
                    own.snapshots_per_vm,
                    "-".into(),
                ),
                (
                    "stored_bytes",
                    limits.stored_bytes,
                    own.stored_bytes,
                    usage.stored_bytes.to_string(),
                ),
            ];
            for (name, value, own, used) in rows {
                let source = if own.is_some() { "owner" } else { "default" };
                println!("{name:<18} {value:>14} {used:>14}  {source}");
            }
        }
    }
    Ok(())
}

/// One daemon per data directory: a second one would kill the first one's VMs in recovery.
fn lock_data_dir(cfg: &Config) -> anyhow::Result<std::fs::File> {
    let path = cfg.data_dir.join("hatch.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    anyhow::ensure!(
        rc == 0,
        "another hatch daemon is using {}",
        cfg.data_dir.display()
    );
    Ok(file)
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HATCH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = config()?;
    let store = open_store(&cfg).await?;
    let _lock = lock_data_dir(&cfg)?;
    // Before make_private below, which would quietly make an exposed CA key
    // 0600: one others could read must stop the start instead.
    let ca_dir = cfg.data_dir.join("ssh");
    let (ca, made) = tokio::task::spawn_blocking(move || hatch::ssh::Ca::load_or_create(&ca_dir))
        .await?
        .context("the SSH CA (src/ssh)")?;
    tracing::info!(public_key = %ca.public_key(), new = made, "SSH CA");
    let data_dir = cfg.data_dir.clone();
    tokio::task::spawn_blocking(move || hatch::vmm::confine::make_private(&data_dir))
        .await?
        .context("making the data directory private")?;
    let backends = hatch::vmm::Backends::from_config(&cfg).map_err(anyhow::Error::msg)?;
    let addr = cfg.http_addr;
    let api_cfg = cfg.api.clone();
    let objects = hatch::snapshot::Objects::from_config(&cfg).context("snapshot store")?;
    tracing::info!(store = %objects.describe(), "snapshot store");
    let auth = api::Authenticator::new(&cfg.auth).map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(keys = %auth.describe(), "API keys");
    let manager = Manager::new(store, objects, backends, cfg);
    // Before recovery: VMs it boots again get seeds that carry the CA.
    manager.set_ssh_ca(Arc::new(ca));
    manager.recover().await?;
    manager.init_network().await;
    manager.seed_default_image().await?;
    manager.init_routes().await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "hatch API listening");
    let proxy_cfg = manager.proxy_config().clone();
    if let Some(paddr) = proxy_cfg.addr {
        let base_domain = proxy_cfg.base_domain.clone();
        let threads = proxy_cfg.threads;
        let bound = hatch::proxy::start(paddr, manager.clone(), proxy_cfg).with_context(|| {
            format!(
                "starting the proxy on {paddr} (HATCH_PROXY_ADDR; `off` disables the proxy; \
                 HATCH_PROXY_ACCESS_LOG names its access log)"
            )
        })?;
        tracing::info!(addr = %bound, %base_domain, threads, "hatch proxy listening");
    }
    match manager.idle_timeout() {
        Some(t) => tracing::info!(timeout_secs = t.as_secs_f64(), "idle sleep on (HATCH_IDLE_TIMEOUT)"),
        None => tracing::info!("idle sleep only for VMs with their own idle_timeout_seconds (HATCH_IDLE_TIMEOUT is off)"),
    }
    tokio::spawn(manager.clone().idle_monitor());
    let app = api::router(Arc::new(AppState {
        manager: manager.clone(),
        auth,
    }));
    // VMs are stopped before the server drains, so open `logs?follow=true` streams end.
    let stopper = manager.clone();
    let on_signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: stopping running VMs");
        stopper.shutdown_all().await;
    };
    api::serve(listener, app, &api_cfg, on_signal).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
