# C declarations from <linux/fuse.h> (the FUSE wire protocol): only what hvcore.fs.proto uses.
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int32_t, int64_t


cdef extern from "<sys/ioctl.h>":
    pass    # _IOR, used by FUSE_DEV_IOC_CLONE


cdef extern from "<linux/fuse.h>" nogil:
    enum:
        FUSE_KERNEL_VERSION
        FUSE_KERNEL_MINOR_VERSION
        FUSE_ROOT_ID
        FUSE_MIN_READ_BUFFER
        FUSE_COMPAT_SETXATTR_IN_SIZE

    struct fuse_attr:
        uint64_t ino
        uint64_t size
        uint64_t blocks
        uint64_t atime
        uint64_t mtime
        uint64_t ctime
        uint32_t atimensec
        uint32_t mtimensec
        uint32_t ctimensec
        uint32_t mode
        uint32_t nlink
        uint32_t uid
        uint32_t gid
        uint32_t rdev
        uint32_t blksize
        uint32_t flags

    struct fuse_kstatfs:
        uint64_t blocks
        uint64_t bfree
        uint64_t bavail
        uint64_t files
        uint64_t ffree
        uint32_t bsize
        uint32_t namelen
        uint32_t frsize

    struct fuse_file_lock:
        uint64_t start
        uint64_t end
        uint32_t type
        uint32_t pid

    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
        uint32_t uid
        uint32_t gid
        uint32_t pid
        uint16_t total_extlen

    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique

    struct fuse_entry_out:
        uint64_t nodeid
        uint64_t generation
        uint64_t entry_valid
        uint64_t attr_valid
        uint32_t entry_valid_nsec
        uint32_t attr_valid_nsec
        fuse_attr attr

    struct fuse_forget_in:
        uint64_t nlookup
    struct fuse_forget_one:
        uint64_t nodeid
        uint64_t nlookup
    struct fuse_batch_forget_in:
        uint32_t count

    struct fuse_getattr_in:
        uint32_t getattr_flags
        uint64_t fh

    struct fuse_attr_out:
        uint64_t attr_valid
        uint32_t attr_valid_nsec
        fuse_attr attr

    struct fuse_mknod_in:
        uint32_t mode
        uint32_t rdev
        uint32_t umask
    struct fuse_mkdir_in:
        uint32_t mode
        uint32_t umask
    struct fuse_rename_in:
        uint64_t newdir
    struct fuse_rename2_in:
        uint64_t newdir
        uint32_t flags
    struct fuse_link_in:
        uint64_t oldnodeid

    struct fuse_setattr_in:
        uint32_t valid
        uint64_t fh
        uint64_t size
        uint64_t lock_owner
        uint64_t atime
        uint64_t mtime
        uint64_t ctime
        uint32_t atimensec
        uint32_t mtimensec
        uint32_t ctimensec
        uint32_t mode
        uint32_t uid
        uint32_t gid

    struct fuse_open_in:
        uint32_t flags
        uint32_t open_flags
    struct fuse_create_in:
        uint32_t flags
        uint32_t mode
        uint32_t umask
        uint32_t open_flags
    struct fuse_open_out:
        uint64_t fh
        uint32_t open_flags
    struct fuse_release_in:
        uint64_t fh
        uint32_t flags
        uint32_t release_flags
        uint64_t lock_owner
    struct fuse_flush_in:
        uint64_t fh
        uint64_t lock_owner
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t read_flags
        uint64_t lock_owner
        uint32_t flags
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t write_flags
        uint64_t lock_owner
        uint32_t flags
    struct fuse_write_out:
        uint32_t size
    struct fuse_statfs_out:
        fuse_kstatfs st
    struct fuse_fsync_in:
        uint64_t fh
        uint32_t fsync_flags
    struct fuse_setxattr_in:
        uint32_t size
        uint32_t flags
        uint32_t setxattr_flags
    struct fuse_getxattr_in:
        uint32_t size
    struct fuse_getxattr_out:
        uint32_t size
    struct fuse_lk_in:
        uint64_t fh
        uint64_t owner
        fuse_file_lock lk
        uint32_t lk_flags
    struct fuse_lk_out:
        fuse_file_lock lk
    struct fuse_access_in:
        uint32_t mask
    struct fuse_init_in:
        uint32_t major
        uint32_t minor
        uint32_t max_readahead
        uint32_t flags
        uint32_t flags2
    struct fuse_init_out:
        uint32_t major
        uint32_t minor
        uint32_t max_readahead
        uint32_t flags
        uint16_t max_background
        uint16_t congestion_threshold
        uint32_t max_write
        uint32_t time_gran
        uint16_t max_pages
        uint16_t map_alignment
        uint32_t flags2
    struct fuse_interrupt_in:
        uint64_t unique
    struct fuse_fallocate_in:
        uint64_t fh
        uint64_t offset
        uint64_t length
        uint32_t mode
    struct fuse_dirent:
        uint64_t ino
        uint64_t off
        uint32_t namelen
        uint32_t type
        char name[1]
    struct fuse_direntplus:
        fuse_entry_out entry_out
        fuse_dirent dirent
    struct fuse_notify_inval_inode_out:
        uint64_t ino
        int64_t off
        int64_t len
    struct fuse_notify_inval_entry_out:
        uint64_t parent
        uint32_t namelen
        uint32_t flags
    struct fuse_notify_delete_out:
        uint64_t parent
        uint64_t child
        uint32_t namelen
    struct fuse_lseek_in:
        uint64_t fh
        uint64_t offset
        uint32_t whence
    struct fuse_lseek_out:
        uint64_t offset
    struct fuse_copy_file_range_in:
        uint64_t fh_in
        uint64_t off_in
        uint64_t nodeid_out
        uint64_t fh_out
        uint64_t off_out
        uint64_t len
        uint64_t flags

    size_t FUSE_NAME_OFFSET
    size_t FUSE_NAME_OFFSET_DIRENTPLUS
    unsigned long FUSE_DEV_IOC_CLONE

    enum fuse_opcode:
        FUSE_LOOKUP
        FUSE_FORGET
        FUSE_GETATTR
        FUSE_SETATTR
        FUSE_READLINK
        FUSE_SYMLINK
        FUSE_MKNOD
        FUSE_MKDIR
        FUSE_UNLINK
        FUSE_RMDIR
        FUSE_RENAME
        FUSE_LINK
        FUSE_OPEN
        FUSE_READ
        FUSE_WRITE
        FUSE_STATFS
        FUSE_RELEASE
        FUSE_FSYNC
        FUSE_SETXATTR
        FUSE_GETXATTR
        FUSE_LISTXATTR
        FUSE_REMOVEXATTR
        FUSE_FLUSH
        FUSE_INIT
        FUSE_OPENDIR
        FUSE_READDIR
        FUSE_RELEASEDIR
        FUSE_FSYNCDIR
        FUSE_GETLK
        FUSE_SETLK
        FUSE_SETLKW
        FUSE_ACCESS
        FUSE_CREATE
        FUSE_INTERRUPT
        FUSE_BMAP
        FUSE_DESTROY
        FUSE_IOCTL
        FUSE_POLL
        FUSE_NOTIFY_REPLY
        FUSE_BATCH_FORGET
        FUSE_FALLOCATE
        FUSE_READDIRPLUS
        FUSE_RENAME2
        FUSE_LSEEK
        FUSE_COPY_FILE_RANGE
        FUSE_SETUPMAPPING
        FUSE_REMOVEMAPPING
        FUSE_SYNCFS
        FUSE_TMPFILE

    enum fuse_notify_code:
        FUSE_NOTIFY_INVAL_INODE
        FUSE_NOTIFY_INVAL_ENTRY
        FUSE_NOTIFY_DELETE

    enum:
        FATTR_MODE
        FATTR_UID
        FATTR_GID
        FATTR_SIZE
        FATTR_ATIME
        FATTR_MTIME
        FATTR_FH
        FATTR_ATIME_NOW
        FATTR_MTIME_NOW
        FATTR_LOCKOWNER
        FATTR_CTIME
        FATTR_KILL_SUIDGID
        FOPEN_DIRECT_IO
        FOPEN_KEEP_CACHE
        FOPEN_NONSEEKABLE
        FOPEN_CACHE_DIR
        FUSE_ASYNC_READ
        FUSE_POSIX_LOCKS
        FUSE_ATOMIC_O_TRUNC
        FUSE_EXPORT_SUPPORT
        FUSE_BIG_WRITES
        FUSE_DONT_MASK
        FUSE_FLOCK_LOCKS
        FUSE_AUTO_INVAL_DATA
        FUSE_DO_READDIRPLUS
        FUSE_READDIRPLUS_AUTO
        FUSE_ASYNC_DIO
        FUSE_WRITEBACK_CACHE
        FUSE_PARALLEL_DIROPS
        FUSE_HANDLE_KILLPRIV
        FUSE_MAX_PAGES
        FUSE_CACHE_SYMLINKS
        FUSE_EXPLICIT_INVAL_DATA
        FUSE_HANDLE_KILLPRIV_V2
        FUSE_SETXATTR_EXT
        FUSE_INIT_EXT
        FUSE_RELEASE_FLUSH
        FUSE_RELEASE_FLOCK_UNLOCK
        FUSE_GETATTR_FH
        FUSE_LK_FLOCK
        FUSE_WRITE_CACHE
        FUSE_WRITE_LOCKOWNER
        FUSE_WRITE_KILL_SUIDGID
        FUSE_FSYNC_FDATASYNC
        FUSE_OPEN_KILL_SUIDGID
