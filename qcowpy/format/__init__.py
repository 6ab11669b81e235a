"""Pure on-disk structures of qcow2: header, extensions, table entries, snapshots."""
