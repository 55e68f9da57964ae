#!/usr/bin/env bash
# Builds a PostgreSQL image from this machine's own server files: no registry is reachable here.
#
# The root filesystem holds /usr/lib/postgresql/<v>/{bin,lib}, /usr/share/postgresql/<v>, the
# shared libraries ldd finds for them, dash as /bin/sh, zoneinfo, /etc/passwd and /etc/group with
# a postgres account, and an entrypoint that honours POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB
# and PGPORT like the official image (postgres itself logs "database system is ready to accept
# connections"). Usage: build-postgres-image.sh [VERSION] (default: newest installed); FORCE=1
# rebuilds an existing tag. Prints the tag.
set -euo pipefail

version=${1:-$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)}
[ -n "$version" ] && [ -x "/usr/lib/postgresql/$version/bin/postgres" ] || {
    echo "build-postgres-image: no PostgreSQL server in /usr/lib/postgresql/${version:-*}/bin" >&2
    exit 2
}
tag=${CONNGUARD_IMAGE_TAG:-connguard/postgres-local:$version}
if [ -z "${FORCE:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    exit 0
fi

root=$(mktemp -d /tmp/connguard-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
pg=/usr/lib/postgresql/$version

mkdir -p "$root$pg" "$root/usr/share/postgresql" "$root/bin" "$root/etc" "$root/tmp" \
    "$root/usr/local/bin" "$root/var/lib/postgresql/data" "$root/var/run/postgresql"
cp -a "$pg/bin" "$pg/lib" "$root$pg/"
# JIT pulls in libLLVM (about 100 MB); the tests run with jit=off.
rm -rf "$root$pg/lib/llvmjit"* "$root$pg/lib/bitcode"
cp -a "/usr/share/postgresql/$version" "$root/usr/share/postgresql/"
[ -d /usr/share/zoneinfo ] && cp -a --parents /usr/share/zoneinfo "$root"
cp -L /bin/dash "$root/bin/sh"

# Every shared library of every ELF file we ship, plus the dynamic loader.
{
    find "$root$pg/bin" "$root$pg/lib" -type f | while read -r f; do
        [ "$(head -c 4 "$f" | tail -c 3)" = ELF ] && echo "$f"
    done
    echo /bin/dash
} | while read -r elf; do
    ldd "$elf" 2>/dev/null | awk '/=> \//{print $3} $1 ~ /^\/.*ld-linux/{print $1}'
done | sort -u | while read -r lib; do
    cp -L --parents "$lib" "$root"
done

uid=$(id -u postgres 2>/dev/null || echo 999)
gid=$(id -g postgres 2>/dev/null || echo 999)
printf 'root:x:0:0:root:/root:/bin/sh\npostgres:x:%s:%s:PostgreSQL:/var/lib/postgresql:/bin/sh\n' \
    "$uid" "$gid" >"$root/etc/passwd"
printf 'root:x:0:\npostgres:x:%s:\n' "$gid" >"$root/etc/group"

cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'ENTRYPOINT'
#!/bin/sh
# Initialise the cluster once (honouring POSTGRES_USER/PASSWORD/DB), then exec postgres (PGPORT
# is read by postgres itself). Arguments: "postgres [options]" as with the official image.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        printf '%s\n' "$POSTGRES_PASSWORD" >/tmp/pwfile
        initdb -D "$PGDATA" -U "$user" --pwfile=/tmp/pwfile -E UTF8 --locale=C --no-sync \
            --auth-local=trust --auth-host=scram-sha-256 >/tmp/initdb.log 2>&1 \
            || { cat /tmp/initdb.log >&2; exit 1; }
        : >/tmp/pwfile  # no rm in this image; truncating drops the secret
    else
        initdb -D "$PGDATA" -U "$user" -E UTF8 --locale=C --no-sync --auth=trust \
            >/tmp/initdb.log 2>&1 || { cat /tmp/initdb.log >&2; exit 1; }
    fi
    printf 'host all all all %s\n' "$([ -n "${POSTGRES_PASSWORD:-}" ] && echo scram-sha-256 || echo trust)" \
        >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        printf 'CREATE DATABASE "%s";\n' "$db" | postgres --single -j -D "$PGDATA" postgres >/dev/null
    fi
fi
if [ "${1:-postgres}" = postgres ]; then
    [ $# -gt 0 ] && shift
    exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
ENTRYPOINT
chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"
chmod 1777 "$root/tmp"
chown -R "$uid:$gid" "$root/var/lib/postgresql" "$root/var/run/postgresql"
chmod 700 "$root/var/lib/postgresql/data"

tar -C "$root" --numeric-owner -cf - . | docker import \
    --change "USER postgres" \
    --change "ENV PATH=$pg/bin:/bin PGDATA=/var/lib/postgresql/data" \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    --change 'EXPOSE 5432' \
    - "$tag" >/dev/null
echo "$tag"
