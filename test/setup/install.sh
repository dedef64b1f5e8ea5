#!/bin/sh
# Runs before `npm test` (package.json "pretest"): installs the Debian packages the tests need
# (test/setup/debian-packages.txt) when any is missing. As root it installs them; otherwise it
# uses `sudo -n` when that works without a password, and else prints one line naming the
# packages and the command to run, and fails. BLKIF_TEST_NO_INSTALL=1 only checks.
set -eu
cd "${0%/*}"

has() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    gcc-m32) echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /dev/null 2>/dev/null ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

need=""
while read -r what pkg; do
  case "$what" in ''|'#'*) continue ;; esac
  has "$what" && continue
  case " $need " in *" $pkg "*) ;; *) need="${need:+$need }$pkg" ;; esac
done < debian-packages.txt

[ -z "$need" ] && exit 0

if [ "${BLKIF_TEST_NO_INSTALL:-}" != 1 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"
  else sudo=none
  fi
  if [ "$sudo" != none ]; then
    echo "installing Debian packages the tests need: $need" >&2
    # Xen's tools would start their services as they install (xencommons, xendomains): refuse
    # service starts for this install only, unless the machine already has its own policy.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      # shellcheck disable=SC2064 # the path is fixed now
      trap "$sudo rm -f $policy" EXIT
      printf '#!/bin/sh\n# blkif test/setup/install.sh: no service starts while it installs\nexit 101\n' | $sudo tee "$policy" >/dev/null
      $sudo chmod 755 "$policy"
    fi
    # shellcheck disable=SC2086 # $need is a list of package names
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >&2
    exit 0
  fi
fi
echo "the tests need Debian packages that are missing: $need; install them with: sudo apt-get install -y $need" >&2
exit 1
