"""Names, shapes and units of the HDF5 measurement dump shared by `hil measure` and `hil fit`.

Layout (N cells, T read times, R repeats per time):

    /                      attrs: schema, schema_version, software_version, device_idn,
                                  geometry (JSON), settings (JSON), truth (JSON noise model, sim only),
                                  created (ISO time), complete (bool)
    /cells/tile,row,col    (N,)      int32   units "index"
    /cells/g_target        (N,)      float32 units "uS"
    /cells/stuck           (N,)      int8    units "flag"   (device-reported: 0 ok, 1 low, 2 high, -1 unknown)
    /program/pulses        (N,)      int16   units "count"
    /program/verified      (N,)      int8    units "flag"
    /program/done          (B,)      int8    units "flag"   (one per program block; resume marker)
    /reads/t               (T,)      float64 units "s"      (time after end of programming)
    /reads/g               (T, R, N) float32 units "uS"     (NaN where not yet measured)
    /reads/clock           (T, R)    float64 units "s"      (device clock at each read pass)
    /reads/done            (T, R)    int8    units "flag"   (resume marker per read pass)
"""

SCHEMA = "romer-hil/measurement"
SCHEMA_VERSION = 1

DATASETS: dict[str, tuple[str, str]] = {
    # path: (dtype, units)
    "cells/tile": ("int32", "index"),
    "cells/row": ("int32", "index"),
    "cells/col": ("int32", "index"),
    "cells/g_target": ("float32", "uS"),
    "cells/stuck": ("int8", "flag"),
    "program/pulses": ("int16", "count"),
    "program/verified": ("int8", "flag"),
    "program/done": ("int8", "flag"),
    "reads/t": ("float64", "s"),
    "reads/g": ("float32", "uS"),
    "reads/clock": ("float64", "s"),
    "reads/done": ("int8", "flag"),
}
