"""In-place BLAS ``dtrsm`` on a leading sub-block of a larger Fortran-ordered matrix.

SciPy's Python BLAS wrappers copy any argument that is not contiguous, and the leading ``s x s``
block of a preallocated ``(n, n)`` factor never is: every incremental step would copy the whole
factor (``O(s^2)`` memory traffic, ~40 % of a step at ``s ~ 1,500``). SciPy also exports the raw
Fortran BLAS routines as C function pointers (``scipy.linalg.cython_blas.__pyx_capi__``, its
public Cython API); calling ``dtrsm`` through ``ctypes`` lets us pass the leading dimension and
solve on the sub-block without a copy. If that binding is unavailable the copying path is used.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
from scipy.linalg import blas

__all__ = ["trsm_lower_inplace", "HAVE_RAW_TRSM"]

log = logging.getLogger(__name__)

_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_dbl_p = ctypes.POINTER(ctypes.c_double)


def _bind_dtrsm():
    try:
        from scipy.linalg import cython_blas

        capsule = cython_blas.__pyx_capi__["dtrsm"]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype = ctypes.c_char_p
        get_name.argtypes = [ctypes.py_object]
        get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        get_ptr.restype = ctypes.c_void_p
        get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
        ptr = get_ptr(capsule, get_name(capsule))
        if not ptr:
            return None
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                 _c_int_p, _c_int_p, _c_dbl_p, _c_dbl_p, _c_int_p, _c_dbl_p, _c_int_p)
        fn = proto(ptr)
        # Self-check on a tiny system before trusting the binding.
        a = np.asfortranarray(np.array([[2.0, 9.0, 9.0], [1.0, 4.0, 9.0], [9.0, 9.0, 9.0]]))
        b = np.asfortranarray(np.array([[2.0], [9.0]]))
        _call(fn, a, 2, b)
        if not np.allclose(b[:, 0], [1.0, 2.0]):
            return None
        return fn
    except Exception as err:  # pragma: no cover - depends on the SciPy build
        log.debug("raw BLAS dtrsm binding unavailable (%s); using the copying path", err)
        return None


def _call(fn, a: np.ndarray, s: int, b: np.ndarray) -> None:
    m, nrhs = ctypes.c_int(s), ctypes.c_int(b.shape[1])
    lda, ldb = ctypes.c_int(a.shape[0]), ctypes.c_int(b.shape[0])
    one = ctypes.c_double(1.0)
    fn(b"L", b"L", b"N", b"N", ctypes.byref(m), ctypes.byref(nrhs), ctypes.byref(one),
       a.ctypes.data_as(_c_dbl_p), ctypes.byref(lda), b.ctypes.data_as(_c_dbl_p), ctypes.byref(ldb))


_DTRSM = _bind_dtrsm()
HAVE_RAW_TRSM = _DTRSM is not None


def trsm_lower_inplace(a: np.ndarray, s: int, b: np.ndarray) -> np.ndarray:
    """Overwrite ``b (s, k)`` with ``a[:s, :s]^-1 b`` for the lower triangle of ``a``.

    Args:
        a: float64 Fortran-ordered ``(N, N)`` with ``N >= s``; only ``a[:s, :s]``'s lower triangle is read.
        s: order of the leading block.
        b: float64 Fortran-ordered ``(s, k)``, overwritten.

    Returns:
        ``b`` (the same array, or a new one on the copying fallback path).
    """
    if s == 0 or b.shape[1] == 0:
        return b
    if _DTRSM is not None and a.flags.f_contiguous and b.flags.f_contiguous and a.dtype == np.float64 \
            and b.dtype == np.float64 and b.shape[0] == s:
        _call(_DTRSM, a, s, b)
        return b
    return blas.dtrsm(1.0, np.asfortranarray(a[:s, :s]), b, lower=1)
