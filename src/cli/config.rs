//! Where the CLI finds the daemon and its key: flags, then HATCH_URL/HATCH_API_KEY, then the config file.

use super::CliError;
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The address used when neither a flag, the environment nor the file names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The connection flags. clap reads the environment for each one it is not
/// given, so only the file is left to [`Settings::resolve`].
#[derive(Args, Debug, Clone, Default)]
pub struct Connection {
    /// The daemon's API address [default: http://127.0.0.1:8080]
    #[arg(long, global = true, env = "HATCH_URL")]
    pub url: Option<String>,
    /// The API key (better in HATCH_API_KEY or the config file than on a command line).
    #[arg(long, global = true, env = "HATCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The config file [default: $XDG_CONFIG_HOME/hatch/config.toml, else ~/.config/hatch/config.toml]
    #[arg(long, global = true, env = "HATCH_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The config file: `url` and `api_key`, both optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct File {
    url: Option<String>,
    api_key: Option<String>,
}

/// What the client uses, every source applied.
#[derive(Debug, PartialEq)]
pub struct Settings {
    pub url: String,
    pub api_key: Option<String>,
}

impl Settings {
    /// Flags and environment (already merged by clap) over the file over the default.
    pub fn resolve(c: &Connection) -> Result<Settings, CliError> {
        let (path, named) = match &c.config {
            Some(p) => (Some(p.clone()), true),
            None => (default_path(), false),
        };
        let file = match path {
            Some(p) => read_file(&p, named)?,
            None => File::default(),
        };
        Ok(merge(c, file))
    }
}

fn merge(c: &Connection, file: File) -> Settings {
    let url = c
        .url
        .clone()
        .or(file.url)
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    Settings {
        url: url.trim_end_matches('/').to_string(),
        api_key: c.api_key.clone().or(file.api_key),
    }
}

/// `$XDG_CONFIG_HOME/hatch/config.toml`, else `$HOME/.config/hatch/config.toml`.
fn default_path() -> Option<PathBuf> {
    Some(dir()?.join("config.toml"))
}

/// The CLI's own directory: `$XDG_CONFIG_HOME/hatch`, else `$HOME/.config/hatch`.
pub fn dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hatch"))
}

/// A missing default file is no error; a missing file named by `--config` is.
fn read_file(path: &Path, named: bool) -> Result<File, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(File::default()),
        Err(e) => return Err(CliError::Other(format!("reading {}: {e}", path.display()))),
    };
    toml::from_str(&text).map_err(|e| CliError::Other(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(url: Option<&str>, key: Option<&str>) -> Connection {
        Connection {
            url: url.map(Into::into),
            api_key: key.map(Into::into),
            config: None,
        }
    }

    #[test]
    fn flags_and_environment_win_over_the_file_and_the_file_over_the_default() {
        let file = || File {
            url: Some("http://file:1".into()),
            api_key: Some("file-key".into()),
        };
        let s = merge(&conn(Some("http://flag:2/"), Some("flag-key")), file());
        assert_eq!(s.url, "http://flag:2");
        assert_eq!(s.api_key.as_deref(), Some("flag-key"));
        let s = merge(&conn(None, None), file());
        assert_eq!(s.url, "http://file:1");
        assert_eq!(s.api_key.as_deref(), Some("file-key"));
        let s = merge(&conn(None, None), File::default());
        assert_eq!(s.url, DEFAULT_URL);
        assert_eq!(s.api_key, None);
    }

    #[test]
    fn the_file_is_strict_toml() {
        let f: File = toml::from_str("url = \"http://h:1\"\napi_key = \"k\"\n").unwrap();
        assert_eq!(f.url.as_deref(), Some("http://h:1"));
        assert!(toml::from_str::<File>("key = \"k\"\n").is_err());
    }
}
