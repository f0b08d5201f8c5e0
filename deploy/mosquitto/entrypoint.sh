#!/bin/sh
# Starts the lab's broker in its container: docker-compose.yml mounts this
# folder read-only at /mosquitto/lab and runs `sh /mosquitto/lab/entrypoint.sh`.
#
# Why copy instead of mounting the files where Mosquitto reads them:
# Mosquitto reads passwd and the ACLs after dropping root for its own user
# (uid 1883). Mounted straight in, they keep the clone's owner and modes, and
# a clone made under `umask 077` has 0600 files owned by someone else: the
# broker cannot open passwd and exits, and everything that needs it waits
# forever. Copies made here belong to the broker, readable by it alone,
# whatever the clone's umask. scripts/compose-check runs this script
# natively on a umask-077 copy of the folder.
set -eu

lab=/mosquitto/lab
config=/mosquitto/config
data=/mosquitto/data

# The lab's door (mosquitto.conf), then the local door (local.conf).
cat "$lab/mosquitto.conf" "$lab/local.conf" > "$config/mosquitto.conf"
cp "$lab/passwd" "$config/passwd"
cp "$lab/acl" "$config/acl"
cat "$lab/acl.anonymous" "$lab/acl" > "$config/acl.local"

chown mosquitto:mosquitto "$config/mosquitto.conf" "$config/passwd" "$config/acl" "$config/acl.local"
chmod 0644 "$config/mosquitto.conf"
chmod 0600 "$config/passwd" "$config/acl" "$config/acl.local"
# The named volume that keeps sessions and queued messages across restarts.
chown -R mosquitto:mosquitto "$data"

exec mosquitto -c "$config/mosquitto.conf"
