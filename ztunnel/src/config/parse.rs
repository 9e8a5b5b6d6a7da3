//! Reading the settings: flags and environment variables through clap, the `--config` file
//! beneath them, and errors that name the setting.
//!
//! The file is merged without knowing any setting: its values become the defaults clap falls
//! back to, so precedence is clap's own (flag > environment > file > built-in default) and a
//! file value goes through the same parser as the flag. A setting is therefore declared once,
//! as a field of [`RunArgs`].

use std::collections::BTreeMap;
use std::error::Error as _;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, Args, Command, Parser};

use super::{ConfigError, RunArgs};

/// Parses a command line whose top level flattens [`RunArgs`] (the binary's `cli::Cli`, or a
/// test's own parser) from `argv` (program name first) and the environment, with the settings
/// of the `--config` file under flags and environment variables. The file is only read when no
/// subcommand was given. `--help`, `--version` and usage errors come back as
/// [`ConfigError::Usage`], for `clap::Error::exit`.
pub fn parse<C: Parser>(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<C, ConfigError> {
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let first = C::command()
        .try_get_matches_from(&argv)
        .map_err(setting_error)?;
    let file = match first.try_get_one::<PathBuf>("config") {
        Ok(Some(path)) if first.subcommand().is_none() => Some(path.clone()),
        _ => None,
    };
    let Some(path) = file else {
        return C::from_arg_matches(&first).map_err(setting_error);
    };
    let cmd = with_file_defaults(C::command(), &path)?;
    // Flags and environment parsed once already, so an error now is the file's value.
    let matches = cmd
        .try_get_matches_from(&argv)
        .map_err(|e| match setting_error(e) {
            e @ ConfigError::Invalid { .. } => ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            },
            e => e,
        })?;
    C::from_arg_matches(&matches).map_err(setting_error)
}

/// The daemon settings alone, as clap declares them.
pub(super) fn settings() -> Command {
    RunArgs::augment_args(Command::new("ztunnel"))
}

/// `cmd` with the values of the YAML file at `path` as the defaults of the settings it names.
/// Keys are the long flag names; a value is a string, number or boolean, or a list of them for
/// a setting that takes several.
fn with_file_defaults(mut cmd: Command, path: &Path) -> Result<Command, ConfigError> {
    let file_error = |message: String| ConfigError::File {
        path: path.into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let entries: Option<BTreeMap<String, serde_yaml_ng::Value>> =
        serde_yaml_ng::from_str(&text).map_err(|e| file_error(e.to_string()))?;
    let settings = settings();
    for (key, value) in entries.unwrap_or_default() {
        let arg = settings
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| {
                file_error(format!(
                    "unknown key `{key}` (keys are the long flag names of `ztunnel --help`)"
                ))
            })?;
        let several = matches!(arg.get_action(), ArgAction::Append);
        let values = match value {
            serde_yaml_ng::Value::Null => continue,
            serde_yaml_ng::Value::Sequence(items) if several => items
                .into_iter()
                .map(scalar)
                .collect::<Option<Vec<String>>>(),
            v => scalar(v).map(|v| vec![v]),
        };
        let values = values.ok_or_else(|| {
            let expected = if several {
                "a value or a list"
            } else {
                "one value"
            };
            file_error(format!("key `{key}`: expected {expected}"))
        })?;
        cmd = cmd.mut_arg(arg.get_id(), |a| a.default_values(values));
    }
    Ok(cmd)
}

fn scalar(v: serde_yaml_ng::Value) -> Option<String> {
    match v {
        serde_yaml_ng::Value::String(s) => Some(s),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// clap's error for a bad value of a daemon setting as [`ConfigError::Invalid`] (naming flag,
/// environment variable and file key); any other error (help, version, a subcommand's flag, an
/// unknown flag) as [`ConfigError::Usage`].
fn setting_error(e: clap::Error) -> ConfigError {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return ConfigError::Usage(e);
    }
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    // "--hbone-port <HBONE_PORT>"
    let long = context(ContextKind::InvalidArg)
        .and_then(|a| a.strip_prefix("--"))
        .and_then(|a| a.split([' ', '=']).next());
    let settings = settings();
    let Some(arg) = long.and_then(|l| settings.get_arguments().find(|a| a.get_long() == Some(l)))
    else {
        return ConfigError::Usage(e);
    };
    let why = match (e.source(), e.get(ContextKind::ValidValue)) {
        (Some(source), _) => source.to_string(),
        (None, Some(ContextValue::Strings(valid))) => format!("expected {}", valid.join(" or ")),
        _ => "invalid value".into(),
    };
    ConfigError::Invalid {
        flag: arg.get_long().unwrap_or_default().to_string(),
        env: arg
            .get_env()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default(),
        message: format!(
            "`{}`: {why}",
            context(ContextKind::InvalidValue).unwrap_or("")
        ),
    }
}
