#!/usr/bin/env bash
# Checks leasehold's Debian package (built by packaging/build-deb.sh) with
# dpkg-deb alone, without installing it: the binary runs, the man pages,
# completions, examples and systemd units are where Debian looks for them,
# the units wait for their configuration and keep their data 0700, the
# maintainer scripts create the user and enable or start nothing; and the
# units pass `systemd-analyze verify` where systemd-analyze exists.
#
#   packaging/check-deb.sh target/debian/leasehold_0.1.0-1_amd64.deb
set -euo pipefail

deb=${1:?usage: check-deb.sh PACKAGE.deb}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
checks=0
failures=0

pass() { checks=$((checks + 1)); echo "check-deb: ok   $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "check-deb: FAIL $*"; }
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds.
check() {
    local description=$1
    shift
    if "$@" >/dev/null 2>&1; then pass "$description"; else fail "$description"; fi
}

dpkg-deb -I "$deb" >"$work/info"
dpkg-deb -c "$deb" >"$work/contents"
dpkg-deb -e "$deb" "$work/control"
dpkg-deb -x "$deb" "$work/root"
root=$work/root

# A file listed with mode $2, owned by root (uid/gid 0), as `dpkg-deb -c`
# prints it.
listed() { grep -Eq "^$2 (0/0|root/root) .* \./$1\$" "$work/contents"; }

check "the package is named leasehold" grep -q '^ Package: leasehold$' "$work/info"
check "it depends on passwd (useradd)" grep -Eq '^ Depends: .*passwd' "$work/info"
check "it recommends runc" grep -Eq '^ Recommends: .*runc' "$work/info"

check "/usr/bin/leasehold, 0755 root" listed usr/bin/leasehold '-rwxr-xr-x'
check "the binary runs and is leasehold" sh -c "'$root/usr/bin/leasehold' --version | grep -q '^leasehold '"

for page in leasehold leasehold-broker leasehold-agent leasehold-images-serve leasehold-lease leasehold-man; do
    check "man page $page.1.gz, 0644" listed "usr/share/man/man1/$page.1.gz" '-rw-r--r--'
done
check "leasehold.1 is roff naming the verbs" sh -c "zcat '$root/usr/share/man/man1/leasehold.1.gz' | grep -q '^\.TH leasehold 1' && zcat '$root/usr/share/man/man1/leasehold.1.gz' | grep -q 'leasehold\\\\-lease(1)'"

check "bash completion" grep -q 'complete -F _leasehold' "$root/usr/share/bash-completion/completions/leasehold"
check "zsh completion" grep -q '^#compdef leasehold' "$root/usr/share/zsh/vendor-completions/_leasehold"
check "fish completion" grep -q 'complete -c leasehold' "$root/usr/share/fish/vendor_completions.d/leasehold.fish"
for example in broker agent images; do
    check "example /usr/share/doc/leasehold/examples/$example.env" test -f "$root/usr/share/doc/leasehold/examples/$example.env"
done
check "nothing shipped in /etc (no configuration, so no unit starts)" sh -c "! grep -q ' \./etc/' '$work/contents'"

units=$root/usr/lib/systemd/system
for service in broker agent images; do
    unit=$units/leasehold-$service.service
    check "unit leasehold-$service.service, 0644" listed "usr/lib/systemd/system/leasehold-$service.service" '-rw-r--r--'
    check "leasehold-$service waits for /etc/leasehold/$service.env" grep -qx "ConditionPathExists=/etc/leasehold/$service.env" "$unit"
    check "leasehold-$service keeps its data in /var/lib/leasehold/$service" grep -qx "StateDirectory=leasehold/$service" "$unit"
    check "leasehold-$service's data is 0700" grep -qx 'StateDirectoryMode=0700' "$unit"
    check "leasehold-$service runs /usr/bin/leasehold" grep -q '^ExecStart=/usr/bin/leasehold ' "$unit"
done
for service in broker images; do
    unit=$units/leasehold-$service.service
    check "leasehold-$service runs as user leasehold" grep -qx 'User=leasehold' "$unit"
    for option in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes; do
        check "leasehold-$service has $option" grep -qx "$option" "$unit"
    done
done
check "leasehold-agent runs as root and says why" sh -c "grep -qx 'User=root' '$units/leasehold-agent.service' && grep -q '^# Runs as root, on purpose: the isolating .oci. driver' '$units/leasehold-agent.service'"

scripts=$work/control
check "postinst is valid sh" sh -n "$scripts/postinst"
check "postrm is valid sh" sh -n "$scripts/postrm"
check "postinst creates the leasehold system user" grep -q 'useradd --system' "$scripts/postinst"
check "#DEBHELPER# was replaced" sh -c "! grep -q '#DEBHELPER#' '$scripts/postinst' '$scripts/postrm'"
check "postinst registers the units with deb-systemd-helper" grep -q 'deb-systemd-helper update-state leasehold-broker.service' "$scripts/postinst"
# cargo-deb's fragments with enable = false and start = false: a unit is
# enabled again only if the operator had enabled it, and restarted only on
# an upgrade (`try-restart`: if it was running); nothing is started.
enabled_again_only() {
    [ "$(grep -c 'deb-systemd-helper enable' "$scripts/postinst")" = "$(grep -c 'deb-systemd-helper --quiet was-enabled' "$scripts/postinst")" ] \
        && ! grep -Eq 'deb-systemd-invoke (start|restart)' "$scripts/postinst"
}
check "postinst enables and starts no unit" enabled_again_only
check "postrm keeps /var/lib/leasehold on purge" sh -c "! grep -q 'rm -rf' '$scripts/postrm'"

if command -v systemd-analyze >/dev/null; then
    # Each unit as shipped but for ExecStart's binary, which is the
    # unpacked one (the package is not installed); the man pages of
    # Documentation= are checked above.
    mkdir "$work/verify"
    for service in broker agent images; do
        name=leasehold-$service.service
        sed "s#/usr/bin/leasehold #$root/usr/bin/leasehold #" "$units/$name" >"$work/verify/$name"
        # It exits 0 on an unknown key or a bad value (ignored, and
        # warned about): any output fails the check.
        if systemd-analyze verify --man=no "$work/verify/$name" >"$work/verify/$service.out" 2>&1 \
            && [ ! -s "$work/verify/$service.out" ]; then
            pass "systemd-analyze verify $name"
        else
            fail "systemd-analyze verify $name: $(cat "$work/verify/$service.out")"
        fi
    done
else
    echo "check-deb: skipped systemd-analyze verify: systemd-analyze is not installed"
fi

if [ "$failures" -ne 0 ]; then
    echo "check-deb: $failures of $checks checks failed on $deb"
    exit 1
fi
echo "check-deb: all $checks checks passed on $deb"
