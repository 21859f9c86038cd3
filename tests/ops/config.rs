//! The config file sits beneath the environment and the flags, and the merged settings
//! print without secrets: the real binary's `spray config`.

use std::io::Write;
use std::process::Command;

const FILE: &str = r#"
# every kind of value a setting takes
listen = "0.0.0.0:9000"
database_url = "mysql://spray:file-password@db:3306/spray"
redis_url = "redis://:redis-password@cache:6379"
max_amount = 500
max_recipients = 50
receive_window = "30s"
gateway_secret = "file-secret"
log_format = "json"
"#;

/// `spray config` with only the given environment (no inherited `SPRAY_*`).
fn spray_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_spray"))
        .arg("config")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

#[test]
fn defaults_then_file_then_environment_then_flags() {
    let file = config_file(FILE);
    let path = file.path().to_str().unwrap();
    let (ok, out, err) = spray_config(
        &["--config", path, "--max-recipients", "9"],
        &[("SPRAY_MAX_AMOUNT", "77"), ("SPRAY_MAX_RECIPIENTS", "8")],
    );
    assert!(ok, "{err}");
    // Only in the file: the file's.
    assert!(out.contains(r#"listen: "0.0.0.0:9000""#), "{out}");
    assert!(out.contains("receive_window: 30s"), "{out}");
    assert!(out.contains("log_format: Json"), "{out}");
    // File and environment: the environment's.
    assert!(out.contains("max_amount: 77,"), "{out}");
    // File, environment and flag: the flag's.
    assert!(out.contains("max_recipients: 9,"), "{out}");
    // In none of them: the default.
    assert!(out.contains("max_concurrent_requests: 1024"), "{out}");
    assert!(out.contains("lookup_window: 604800s"), "{out}");
}

#[test]
fn the_file_can_be_named_by_the_environment() {
    let file = config_file("max_recipients = 42\n");
    let path = file.path().to_str().unwrap();
    let (ok, out, err) = spray_config(&[], &[("SPRAY_CONFIG", path)]);
    assert!(ok, "{err}");
    assert!(out.contains("max_recipients: 42,"), "{out}");
}

#[test]
fn secrets_from_the_file_never_print() {
    let file = config_file(FILE);
    let path = file.path().to_str().unwrap();
    let (ok, out, err) = spray_config(&["--config", path], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("mysql://spray:***@db:3306/spray"), "{out}");
    assert!(out.contains("redis://:***@cache:6379"), "{out}");
    for secret in ["file-password", "redis-password", "file-secret"] {
        assert!(!out.contains(secret), "{secret} printed: {out}");
    }
}

#[test]
fn a_mistake_in_the_file_stops_the_program_and_names_the_file() {
    let file = config_file("max_recipent = 5\n");
    let path = file.path().to_str().unwrap();
    let (ok, out, err) = spray_config(&["--config", path], &[]);
    assert!(!ok, "{out}");
    assert!(err.contains(path) && err.contains("max_recipent"), "{err}");
}

#[test]
fn the_example_file_in_the_repository_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/spray.toml.example");
    let (ok, out, err) = spray_config(&["--config", path], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("Settings {"), "{out}");
}

#[test]
fn the_example_file_mentions_every_setting() {
    use clap::CommandFactory;
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/spray.toml.example")).unwrap();
    let command = spray::config::Cli::command();
    let settings = command
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| !matches!(*long, "config" | "help" | "version"));
    for long in settings {
        let key = long.replace('-', "_");
        assert!(
            example.contains(&format!("{key} = ")),
            "spray.toml.example does not mention `{key}`"
        );
    }
}
