#!/bin/sh
# Entrypoint of the unlearn image (deploy/Dockerfile). A command runs as given
# (`unlearn train ...`, `ray start --head --block ...`, `bash`); a first word that is no
# command (`train ...`, `--help`) is an unlearn sub-command or option; nothing at all is
# `unlearn --help`. KubeRay sets the container's command itself and does not pass through here.
set -e
if [ "$#" -eq 0 ]; then
    set -- unlearn --help
elif ! command -v -- "$1" >/dev/null 2>&1; then
    set -- unlearn "$@"
fi
exec "$@"
