"""Host directory sharing over the FUSE protocol (pyhv's osxfs).

Layers, each its own module:

- `hvcore.fs.proto` (Cython): FUSE wire structs; decoding is bounds-checked, so a malformed
  request becomes an error reply, never a crash or an out-of-bounds read (its pure-Python
  reference twin, run over the same test cases, is `tests.helpers.share_protoref`).
- `hvcore.fs.ops` (Cython): the system calls (openat2 lookups, file handles, getdents packing,
  inotify decoding, ...). `hvcore.fs.inodes`: the inode table (C). `hvcore.fs.files`: the open
  files by file handle, READ / WRITE. `hvcore.fs.fastpath`: the hot requests (LOOKUP, GETATTR,
  FORGET, OPEN, CREATE, READ, WRITE, FLUSH, RELEASE, UNLINK) answered in C from those two
  tables without the GIL; the /dev/fuse readers loop there, `handle` tries it first, and
  whatever it declines goes to the Python handlers, which use the same tables.
- `server.FuseServer`: the request handler. **Transport interface**: a transport delivers one
  whole request buffer at a time to `FuseServer.handle(buf) -> list[bytes-like]` and writes
  the returned buffers back as one reply (gathered, e.g. `os.writev`); an empty list means
  "no reply" (FORGET, BATCH_FORGET, INTERRUPT). Unsolicited notifications (cache
  invalidation) go through `FuseServer.notify`, a callable the transport sets, taking a list of
  buffers. `handle` is thread-safe: several transport threads may call it at once. The handler
  knows nothing of where buffers come from: `/dev/fuse` now (`devfuse`), a virtio-fs queue
  later.
- `inodes`: the Python face of the inode table: every host inode the client knows is a file
  handle with its O_PATH descriptor in a bounded cache (as root; otherwise one descriptor
  per inode); lookups are single components resolved with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS), so no request can reach a path outside the shared directory.
- `meta` / `data` / `locks`: the passthrough operations (names and attributes; file data;
  POSIX and flock locks).
- `idmap`: `--uid-map/--gid-map` translation. `options`: cache modes and limits.
- `watch`: inotify on the host directories, turned into FUSE invalidation notifications.
- `devfuse`: mount (mount(2) as root, fusermount3 otherwise), cloned /dev/fuse readers.
"""
