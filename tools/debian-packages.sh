# Sourced by tools/demo.sh and tools/test.sh: install_debian_packages P...
# installs the Debian packages among P that are missing (as root, or through
# sudo).  Off Debian it does nothing; a failed install is reported and left
# to the callers' checks (the tests that need a package skip, naming it).
install_debian_packages() {
    command -v apt-get >/dev/null || return 0
    local sudo="" missing="" p
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    $sudo apt-get update -qq || echo "apt-get update failed" >&2
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null \
        || echo "could not install:$missing" >&2
}
