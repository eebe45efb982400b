# The reference walk behind `pyhv img check` (and its repairs).
from hvcore.qcow2_io cimport Q2


cdef dict run_check(Q2 *q, list l1_tables, list fixed, int fix)
