//! The config file: `--config spray.toml` (or `SPRAY_CONFIG`), beneath the environment
//! and the flags. Precedence: defaults < file < environment < flags.
//!
//! clap knows where each value came from, so the file is merged in two passes: parse the
//! command line once to find the file and to learn which settings the environment or a
//! flag already gave; then parse again with the file's other settings placed in front as
//! flags. Values from the file go through the same parsers as flags, so `"10m"` or
//! `"json"` mean the same thing in all three places.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::config::Cli;

/// Why the command line or the config file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad flag or value, or `--help` / `--version` (clap prints those itself).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// Parses the process's command line, environment and config file; on an error prints
/// it (or the help) and exits, as clap does.
pub fn parse() -> Cli {
    match try_parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(ConfigError::Cli(error)) => error.exit(),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    }
}

/// Like [`parse`], from the given arguments (the first is the program name) and the
/// process's environment.
pub fn try_parse_from<I, T>(args: I) -> Result<Cli, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(&args)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let file = read_table(&path)?;
    let mut from_file = Vec::new();
    for (key, value) in &file {
        let id = key.replace('-', "_");
        let known = command
            .get_arguments()
            .find(|arg| arg.get_id() == id.as_str() && arg.get_long().is_some() && id != "config");
        let Some(arg) = known else {
            return Err(file_error(&path, unknown_key(&command, key)));
        };
        // The environment and the flags win over the file.
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let text = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            other => {
                return Err(file_error(
                    &path,
                    format!("`{key}` must be a string or an integer, not {}", other.type_str()),
                ));
            }
        };
        let long = arg.get_long().unwrap_or(id.as_str());
        let mut flag = OsString::from(format!("--{long}="));
        flag.push(text);
        from_file.push(flag);
    }
    let mut merged = Vec::with_capacity(args.len() + from_file.len());
    merged.extend(args.first().cloned());
    merged.extend(from_file);
    merged.extend(args.iter().skip(1).cloned());
    let matches = command
        .clone()
        .try_get_matches_from(merged)
        .map_err(|e| file_error(&path, in_file_terms(&command, &first_line(&e))))?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The keys a file may set: every setting's flag without `--` and with `_` (the file
/// also accepts `-`), `config` excepted.
fn file_keys(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| !matches!(*long, "config" | "help" | "version"))
        .map(|long| long.replace('-', "_"))
        .collect()
}

/// "unknown setting `max_recipent`; did you mean `max_recipients`?", when a known key is
/// close enough to be the one meant.
fn unknown_key(command: &clap::Command, key: &str) -> String {
    let written = key.replace('-', "_");
    let nearest = file_keys(command)
        .into_iter()
        .map(|known| (strsim::jaro_winkler(&written, &known), known))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        // Below this, the nearest key is more likely a wrong guess than the one meant.
        .filter(|(similarity, _)| *similarity >= 0.8);
    match nearest {
        Some((_, known)) => format!("unknown setting `{key}`; did you mean `{known}`?"),
        None => format!(
            "unknown setting `{key}`; the settings are: {}",
            file_keys(command).join(", ")
        ),
    }
}

/// clap's message names a setting as a flag (`'--max-recipients <MAX_RECIPIENTS>'`); in
/// a message about the file, it is named by its key (`max_recipients`).
fn in_file_terms(command: &clap::Command, message: &str) -> String {
    let mut message = message.to_owned();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("'--{long}");
        while let Some(start) = message.find(&flag) {
            let after = start + flag.len();
            // The flag's name ends at a space (before its value name) or the quote.
            if !matches!(message.as_bytes().get(after), Some(b' ' | b'\'')) {
                break;
            }
            let Some(end) = message[after..].find('\'').map(|i| after + i + 1) else {
                break;
            };
            message.replace_range(start..end, &format!("`{}`", long.replace('-', "_")));
        }
    }
    message
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|span| text.get(..span.start).unwrap_or_default().lines().count().max(1));
        let message = match line {
            Some(line) => format!("line {line}: {}", e.message()),
            None => e.message().to_owned(),
        };
        file_error(path, message)
    })
}

fn file_error(path: &Path, message: String) -> ConfigError {
    ConfigError::File {
        path: path.to_owned(),
        message,
    }
}

/// clap's message without its usage lines.
fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;
    use crate::config::{Command, LogFormat};

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents.as_bytes()).unwrap();
        file
    }

    fn parse(args: &[&str]) -> Result<Cli, ConfigError> {
        try_parse_from(std::iter::once("spray").chain(args.iter().copied()))
    }

    #[test]
    fn the_file_fills_what_no_flag_gives() {
        let toml = file(
            r#"
            listen = "0.0.0.0:9000"
            receive-window = "30s"
            max_recipients = 7
            log_format = "json"
            idempotency-lease = "3s"
            "#,
        );
        let path = toml.path().to_str().unwrap();
        let cli = parse(&["serve", "--config", path]).unwrap();
        assert_eq!(cli.command, Some(Command::Serve));
        assert_eq!(cli.settings.listen, "0.0.0.0:9000");
        assert_eq!(cli.settings.receive_window, Duration::from_secs(30));
        assert_eq!(cli.settings.max_recipients, 7);
        assert_eq!(cli.settings.log_format, LogFormat::Json);
        assert_eq!(cli.settings.idempotency_lease, Duration::from_secs(3));
        // What the file does not set keeps its default.
        assert_eq!(cli.settings.max_amount, crate::config::DEFAULT_MAX_AMOUNT);
    }

    #[test]
    fn flags_win_over_the_file() {
        let toml = file("listen = \"0.0.0.0:9000\"\nmax_recipients = 7\n");
        let path = toml.path().to_str().unwrap();
        let cli = parse(&["--config", path, "--listen", "127.0.0.1:1", "migrate"]).unwrap();
        assert_eq!(cli.settings.listen, "127.0.0.1:1");
        assert_eq!(cli.settings.max_recipients, 7);
        assert_eq!(cli.command, Some(Command::Migrate));
    }

    #[test]
    fn a_bad_file_is_refused_with_its_name() {
        for (contents, expected) in [
            (
                "nonsense = 1",
                "unknown setting `nonsense`; the settings are: listen,",
            ),
            (
                "max_recipent = 5",
                "unknown setting `max_recipent`; did you mean `max_recipients`?",
            ),
            ("recieve-window = \"1m\"", "did you mean `receive_window`?"),
            ("config = \"other.toml\"", "unknown setting `config`"),
            ("max_recipients = true", "must be a string or an integer"),
            (
                "max_recipients = \"many\"",
                "invalid value 'many' for `max_recipients`",
            ),
            (
                "receive_window = \"soon\"",
                "invalid value 'soon' for `receive_window`",
            ),
            ("listen = ", "line 1: string values must be quoted"),
        ] {
            let toml = file(contents);
            let path = toml.path().to_str().unwrap();
            let error = parse(&["--config", path]).unwrap_err().to_string();
            assert!(error.contains(path), "{contents}: {error}");
            assert!(
                error.to_lowercase().contains(&expected.to_lowercase()),
                "{contents}: {error}"
            );
            assert!(!error.contains("--"), "{contents}: speaks of flags: {error}");
        }
        let error = parse(&["--config", "/nonexistent/spray.toml"]).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/spray.toml"), "{error}");
    }

    #[test]
    fn without_a_file_nothing_changes() {
        let cli = parse(&["audit", "--max-amount", "5"]).unwrap();
        assert_eq!(cli.command, Some(Command::AUDIT));
        assert_eq!(cli.settings.max_amount, 5);
        assert!(cli.settings.config.is_none());
    }
}
