//! `sqlx::migrate!` embeds the files of `migrations/` at compile time, and cargo does not
//! know it reads them: without this, a migration added or edited is left out of the next
//! build until some Rust file changes (sqlx-cli's `migrate build-script` writes the same).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
