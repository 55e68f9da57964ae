# Sourced by .ci/run (also runnable with bash): a local Docker engine and the PostgreSQL image
# the container tests use. No registry is reachable and nothing may reach a private address, so:
# no bridge, no iptables, containers on host networking only, image built from local files.
# Exports what testcontainers needs here (this machine has /.dockerenv, which otherwise makes
# testcontainers guess a gateway address) and CONNGUARD_TEST_IMAGE for the tests.

_connguard_docker_up() {
    local log=/tmp/connguard-dockerd.log pidfile=/tmp/connguard-dockerd.pid
    if ! command -v dockerd >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        dockerd --bridge=none --iptables=false --ip-masq=false --ip-forward=false \
            --pidfile "$pidfile" >"$log" 2>&1 &
        local i
        for i in $(seq 1 150); do
            docker info >/dev/null 2>&1 && break
            sleep 0.2
        done
        if ! docker info >/dev/null 2>&1; then
            echo "docker-up: dockerd did not answer within 30 s; last lines of $log:" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
    fi
    CONNGUARD_TEST_IMAGE=$(bash "$(dirname "${BASH_SOURCE[0]}")/build-postgres-image.sh") || {
        echo "docker-up: building the PostgreSQL image failed" >&2
        return 1
    }
    export CONNGUARD_TEST_IMAGE
    export TESTCONTAINERS_RYUK_DISABLED=true
    export TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1
    export TESTCONTAINERS_CONNECTION_MODE=docker_host
    echo "docker-up: engine ready (pid $(cat "$pidfile" 2>/dev/null || echo '?')), image $CONNGUARD_TEST_IMAGE"
}
_connguard_docker_up
