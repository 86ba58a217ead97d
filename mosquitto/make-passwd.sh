#!/usr/bin/env bash
# Create or update a Mosquitto password file for modelbus.
#
#   mosquitto/make-passwd.sh FILE user[:password] ...
#
# Each user is added, or has its password replaced. A user given without a
# password gets a random one, printed once to stdout as "user: password" —
# store it now, it is only kept hashed. The file ends up mode 0640 and, when
# run as root on a host with a "mosquitto" user, owned by mosquitto:mosquitto
# so the broker can still read it after dropping root. Reload the broker
# afterwards (systemctl reload mosquitto, i.e. SIGHUP).
#
# Note: passwords given on the command line (and passed on to
# mosquitto_passwd -b) are briefly visible to other local users in ps and may
# land in shell history; prefer generated ones on shared machines.
set -euo pipefail

prog=${0##*/}

usage() {
    cat <<EOF
usage: $prog FILE user[:password] ...

Create FILE (a Mosquitto password file) if needed, then add or update each
user. A user without ":password" gets a random password, printed once as
"user: password". Usernames: letters, digits, '.', '_', '-'.

example: $prog /etc/mosquitto/modelbus/passwd gpu1 operator viewer n8n homeassistant
EOF
}

die_usage() {
    echo "$prog: $1" >&2
    usage >&2
    exit 2
}

if [ "$#" -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
    usage
    exit 0
fi
[ "$#" -ge 2 ] || die_usage "need a password file and at least one user"

file=$1
shift
case $file in
    -*) die_usage "unknown option: $file" ;;
    *:*) die_usage "the first argument is the password file, not a user: $file" ;;
esac

# Validate everything before touching the file.
for spec in "$@"; do
    user=${spec%%:*}
    case $user in
        "" | *[!A-Za-z0-9._-]*) die_usage "bad username in '$spec'" ;;
    esac
    if [ "$spec" != "$user" ] && [ -z "${spec#*:}" ]; then
        die_usage "empty password for '$user' (leave out the ':' to generate one)"
    fi
done

if ! command -v mosquitto_passwd >/dev/null 2>&1; then
    echo "$prog: mosquitto_passwd not found (apt-get install mosquitto)" >&2
    exit 1
fi

random_password() {
    # 18 random bytes -> 24 URL-safe characters (safe inside mqtt://user:pass@host).
    head -c 18 /dev/urandom | base64 | tr '+/' '-_'
}

# Never let the file exist, even briefly, with looser permissions than 0640.
umask 027
if [ ! -e "$file" ]; then
    mkdir -p -- "$(dirname -- "$file")"
    : >"$file"
fi

for spec in "$@"; do
    user=${spec%%:*}
    if [ "$spec" = "$user" ]; then
        password=$(random_password)
        mosquitto_passwd -b "$file" "$user" "$password"
        printf '%s: %s\n' "$user" "$password"
    else
        mosquitto_passwd -b "$file" "$user" "${spec#*:}"
    fi
done

chmod 0640 "$file"
if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$file"
fi
