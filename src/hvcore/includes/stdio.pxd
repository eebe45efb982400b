# C declarations from <stdio.h> (_GNU_SOURCE, glibc >= 2.28): renameat2 for RENAME2 flags.
cdef extern from "<stdio.h>" nogil:
    int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                  unsigned int flags)
