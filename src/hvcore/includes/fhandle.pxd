# C declarations from <fcntl.h> (_GNU_SOURCE): file handles, which name an inode without
# holding a descriptor on it (open_by_handle_at needs CAP_DAC_READ_SEARCH).
cdef extern from "<fcntl.h>" nogil:
    struct file_handle:
        unsigned int handle_bytes
        int handle_type
    enum: MAX_HANDLE_SZ
    int name_to_handle_at(int dirfd, const char *path, file_handle *handle, int *mount_id,
                          int flags)
    int open_by_handle_at(int mount_fd, file_handle *handle, int flags)
