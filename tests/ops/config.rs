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
    let printed: toml::Table = out.parse().unwrap_or_else(|e| panic!("not TOML: {e}\n{out}"));
    // Only in the file: the file's.
    assert_eq!(printed["listen"].as_str(), Some("0.0.0.0:9000"), "{out}");
    assert_eq!(printed["receive_window"].as_str(), Some("30s"), "{out}");
    assert_eq!(printed["log_format"].as_str(), Some("json"), "{out}");
    // File and environment: the environment's.
    assert_eq!(printed["max_amount"].as_integer(), Some(77), "{out}");
    // File, environment and flag: the flag's.
    assert_eq!(printed["max_recipients"].as_integer(), Some(9), "{out}");
    // In none of them: the default.
    assert_eq!(
        printed["max_concurrent_requests"].as_integer(),
        Some(1024),
        "{out}"
    );
    assert_eq!(printed["lookup_window"].as_str(), Some("7days"), "{out}");
}

/// What `spray config` prints, used as the config file with nothing else set, gives the
/// same settings: the output can be pasted into a file as it is.
#[test]
fn the_printed_settings_read_back_as_a_config_file_to_the_same_settings() {
    let dir = tempfile::tempdir().unwrap();
    for flags in [
        &[][..],
        &[
            "--listen",
            "0.0.0.0:9001",
            "--database-url",
            "mysql://spray@db:3306/spray?ssl-mode=REQUIRED",
            "--redis-url",
            "redis://a:7000,redis://b:7000",
            "--receive-window",
            "90s",
            "--lookup-window",
            "1h 30m",
            "--claim-lease",
            "250ms",
            "--max-amount",
            "123456",
            "--log-format",
            "json",
            "--retention-grace",
            "0s",
            "--redis-key-prefix",
            "a \"quoted\" \\ prefix",
        ][..],
    ] {
        let (ok, first, err) = spray_config(flags, &[]);
        assert!(ok, "{flags:?}: {err}");
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, &first).unwrap();
        let (ok, second, err) = spray_config(&["--config", path.to_str().unwrap()], &[]);
        assert!(ok, "{flags:?}: the printed file was refused: {err}\n{first}");
        assert_eq!(first, second, "{flags:?}");
    }
}

/// Settings `serve` would refuse are refused by `config` too (exit 2), and a setting from
/// the file is named by its key.
#[test]
fn config_refuses_what_serve_refuses_and_names_the_key_of_the_file() {
    let output = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_spray"))
            .arg("config")
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let refused = output(&["--receive-window", "10m", "--lookup-window", "5m"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(refused.stdout.is_empty());
    let file = config_file("receive_window = \"10m\"\nlookup_window = \"5m\"\n");
    let path = file.path().to_str().unwrap();
    let refused = output(&["--config", path]);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8(refused.stderr).unwrap();
    assert!(err.contains(&format!("(in {path}: `lookup_window`)")), "{err}");
}

#[test]
fn the_file_can_be_named_by_the_environment() {
    let file = config_file("max_recipients = 42\n");
    let path = file.path().to_str().unwrap();
    let (ok, out, err) = spray_config(&[], &[("SPRAY_CONFIG", path)]);
    assert!(ok, "{err}");
    assert!(out.contains("\nmax_recipients = 42\n"), "{out}");
}

#[test]
fn secrets_from_the_file_never_print() {
    let file = config_file(FILE);
    let path = file.path().to_str().unwrap();
    let (ok, out, err) = spray_config(&["--config", path], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains(r#"database_url = "mysql://spray:***@db:3306/spray""#),
        "{out}"
    );
    assert!(out.contains(r#"redis_url = "redis://:***@cache:6379""#), "{out}");
    assert!(out.contains(r#"gateway_secret = "<hidden>""#), "{out}");
    // Said in a comment, so that nobody pastes it back believing it whole.
    assert!(out.contains("# A password in a URL is printed as ***"), "{out}");
    assert!(
        out.contains("# gateway_secret is set and printed as <hidden>"),
        "{out}"
    );
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
    assert!(err.contains("did you mean `max_recipients`?"), "{err}");
    assert_eq!(status_of(&["--config", path]), Some(2));
    let file = config_file("max_recipients = \"many\"\n");
    let path = file.path().to_str().unwrap();
    let (ok, _, err) = spray_config(&["--config", path], &[]);
    assert!(!ok);
    // The file's key, not the flag.
    assert!(
        err.contains("for `max_recipients`") && !err.contains("--max-recipients"),
        "{err}"
    );
}

#[test]
fn the_example_file_in_the_repository_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/spray.toml.example");
    let (ok, out, err) = spray_config(&["--config", path], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("\nlisten = "), "{out}");
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

fn status_of(args: &[&str]) -> Option<i32> {
    Command::new(env!("CARGO_BIN_EXE_spray"))
        .arg("config")
        .args(args)
        .env_clear()
        .output()
        .unwrap()
        .status
        .code()
}

/// The image sets its settings in a config file, not `ENV` (which would outrank a file an
/// operator mounts), and that file is one spray accepts.
#[test]
fn the_image_sets_no_environment_and_its_config_file_is_valid() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(
        !dockerfile
            .lines()
            .any(|line| line.trim_start().starts_with("ENV") && line.contains("SPRAY_")),
        "the Dockerfile sets a SPRAY_ variable"
    );
    let (_, rest) = dockerfile
        .split_once("COPY <<'EOF' /etc/spray/spray.toml\n")
        .expect("the image's config file");
    let (contents, _) = rest.split_once("\nEOF\n").expect("the end of the config file");
    let file = config_file(contents);
    let (ok, out, err) = spray_config(&["--config", file.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("listen = \"0.0.0.0:8080\"\n"), "{out}");
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/spray", "healthcheck""#));
}
