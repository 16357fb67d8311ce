#!/usr/bin/env bash
# Builds the Debian package of leasehold (target/debian/leasehold_*.deb):
# the release binary, then its man pages and shell completions generated
# from it into packaging/generated/, then `cargo deb` (cargo-deb from
# crates.io) from crates/cli/Cargo.toml's [package.metadata.deb].
# Prints the package's path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p leasehold-cli
binary="${CARGO_TARGET_DIR:-target}/release/leasehold"

generated=packaging/generated
rm -rf "$generated"
mkdir -p "$generated/man" "$generated/completions"
"$binary" man --dir "$generated/man" >/dev/null
"$binary" completions bash >"$generated/completions/leasehold.bash"
"$binary" completions zsh >"$generated/completions/_leasehold"
"$binary" completions fish >"$generated/completions/leasehold.fish"

# --no-build: the binary above is the one packaged; --strip: the debug
# lines of [profile.release] stay out of the package.
cargo deb -p leasehold-cli --no-build --strip 2>&1 >"$generated/cargo-deb.out" | cat >&2
tail -n 1 "$generated/cargo-deb.out"
