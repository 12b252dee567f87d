"""The stack steps on an NVIDIA GPU: one CUDA C kernel per step of :mod:`.array_ops`.

Each kernel is one fused pass over the stack (a thread per element, grid-stride), so an
iteration touches the exit waves a handful of times and makes no temporaries; the object and
probe update sums are scatter-added with float atomics on the (re, im) pairs, the squared
misfit is reduced per block and added once per block. FFTs are cuFFT plans, unnormalised
both ways, made once per stack shape. Nothing leaves the device during an iteration.

Complex64 arrays are ``float2`` in the kernels, and only ``float``, ``float2``, ``int`` and
``double`` builtins are used, so the source compiles with NVRTC (cupy) and with plain nvcc.
"""

from __future__ import annotations

import numpy as np

THREADS = 256
MAX_BLOCKS = 4096

_KERNELS = r"""
__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
    return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
__device__ __forceinline__ float2 conj_mul(float2 a, float2 b) {  /* conj(a) * b */
    return make_float2(a.x * b.x + a.y * b.y, a.x * b.y - a.y * b.x);
}
/* element e of the stack: its probe pixel and the object pixel under it */
__device__ __forceinline__ long long window(long long e, const int* pos, int n, int width,
                                            int* pixel) {
    long long nn = (long long)n * n;
    int f = (int)(e / nn);
    int p = (int)(e - f * nn);
    int i = p / n;
    *pixel = p;
    return (long long)(pos[2 * f] + i) * width + pos[2 * f + 1] + (p - i * n);
}
#define STACK_LOOP(e) \
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; \
         e += (long long)gridDim.x * blockDim.x)

extern "C" {

__global__ void exit_waves(const float2* probe, const float2* obj, const int* pos,
                           float2* out, long long total, int n, int width) {
    STACK_LOOP(e) {
        int p;
        long long o = window(e, pos, n, width, &p);
        out[e] = cmul(probe[p], obj[o]);
    }
}

__global__ void dm_prepare(const float2* psi, const float2* probe, const float2* obj,
                           const int* pos, float2* buf, long long total, int n, int width) {
    STACK_LOOP(e) {
        int p;
        long long o = window(e, pos, n, width, &p);
        float2 v = cmul(probe[p], obj[o]);
        buf[e] = make_float2(2.0f * v.x - psi[e].x, 2.0f * v.y - psi[e].y);
    }
}

__global__ void raar_prepare(float2* psi, const float2* w, const float2* probe,
                             const float2* obj, const int* pos, float beta, float2* buf,
                             long long total, int n, int width) {
    float rest = 0.5f - beta;
    STACK_LOOP(e) {
        int p;
        long long o = window(e, pos, n, width, &p);
        float2 v = cmul(probe[p], obj[o]);
        float2 s = psi[e], t = w[e];
        float2 z = make_float2(0.5f * s.x + beta * v.x + rest * t.x,
                               0.5f * s.y + beta * v.y + rest * t.y);
        psi[e] = z;
        buf[e] = z;
    }
}

__global__ void modulus(float2* buf, const float* amp, long long total, float inv_n,
                        double* err) {
    __shared__ double partial[THREADS];  /* blockDim.x == THREADS, a power of two */
    double local = 0.0;
    float scale2 = inv_n * inv_n;
    STACK_LOOP(e) {
        float2 z = buf[e];
        float a = hypotf(z.x, z.y) * inv_n;  /* no underflow of tiny spectra, as numpy */
        float target = amp[e];
        float d = a - target;
        local += (double)(d * d);
        if (a > 1e-30f) {
            float s = target / a * scale2;
            buf[e] = make_float2(z.x * s, z.y * s);
        } else {
            buf[e] = make_float2(target * inv_n, 0.0f);
        }
    }
    partial[threadIdx.x] = local;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(err, partial[0]);
}

__global__ void dm_finish(float2* psi, const float2* probe, const float2* obj, const int* pos,
                          const float2* buf, float* obj_num, long long total, int n,
                          int width) {
    STACK_LOOP(e) {
        int p;
        long long o = window(e, pos, n, width, &p);
        float2 pr = probe[p];
        float2 v = cmul(pr, obj[o]);
        float2 fresh = make_float2(psi[e].x + buf[e].x - v.x, psi[e].y + buf[e].y - v.y);
        psi[e] = fresh;
        float2 c = conj_mul(pr, fresh);
        atomicAdd(obj_num + 2 * o, c.x);
        atomicAdd(obj_num + 2 * o + 1, c.y);
    }
}

__global__ void raar_finish(const float2* psi, float2* w, const float2* probe, const int* pos,
                            const float2* buf, float* obj_num, long long total, int n,
                            int width) {
    STACK_LOOP(e) {
        int p;
        long long o = window(e, pos, n, width, &p);
        float2 z = make_float2(2.0f * buf[e].x - psi[e].x, 2.0f * buf[e].y - psi[e].y);
        w[e] = z;
        float2 c = conj_mul(probe[p], z);
        atomicAdd(obj_num + 2 * o, c.x);
        atomicAdd(obj_num + 2 * o + 1, c.y);
    }
}

__global__ void illumination(const float2* probe, const int* pos, float* obj_den,
                             long long total, int n, int width) {
    STACK_LOOP(e) {
        int p;
        long long o = window(e, pos, n, width, &p);
        float2 pr = probe[p];
        atomicAdd(obj_den + o, pr.x * pr.x + pr.y * pr.y);
    }
}

/* partial probe sums: thread (g, p) adds frames g, g + groups, ... at probe pixel p */
__global__ void probe_sums(const float2* target, const float2* obj, const int* pos,
                           float2* num, float* den, int frames, int n, int width,
                           int groups) {
    long long nn = (long long)n * n;
    long long total = nn * groups;
    STACK_LOOP(t) {
        int g = (int)(t / nn);
        int p = (int)(t - g * nn);
        int i = p / n, k = p - i * n;
        float2 acc = make_float2(0.0f, 0.0f);
        float weight = 0.0f;
        for (int f = g; f < frames; f += groups) {
            float2 o = obj[(long long)(pos[2 * f] + i) * width + pos[2 * f + 1] + k];
            float2 c = conj_mul(o, target[f * nn + p]);
            acc.x += c.x;
            acc.y += c.y;
            weight += o.x * o.x + o.y * o.y;
        }
        num[t] = acc;
        den[t] = weight;
    }
}

}
"""

SOURCE = f"#define THREADS {THREADS}\n{_KERNELS}"
KERNELS = (
    "exit_waves",
    "dm_prepare",
    "raar_prepare",
    "modulus",
    "dm_finish",
    "raar_finish",
    "illumination",
    "probe_sums",
)
PROBE_GROUPS = 8


class CupyOps:
    """The steps of :class:`.array_ops.NumpyOps` as CUDA kernels on cupy arrays (the current
    device's), same arguments and results except that errors stay on the device."""

    def __init__(self):
        from sparkmpi.apps.cuda import require_cupy

        self.xp = cp = require_cupy()
        module = cp.RawModule(code=SOURCE)
        self.kernel = {name: module.get_function(name) for name in KERNELS}
        self._plans: dict = {}

    def _launch(self, name: str, threads: int, *args) -> None:
        blocks = max(1, min(MAX_BLOCKS, -(-threads // THREADS)))
        self.kernel[name]((blocks,), (THREADS,), args)

    def _stack(self, name: str, geometry, *arrays) -> None:
        """Runs a kernel over every element of the stack; its trailing arguments are the
        element count, the frame edge and the object width."""
        pos, n, width = geometry
        total = len(pos) * n * n
        self._launch(name, total, *arrays, np.int64(total), np.int32(n), np.int32(width))

    def geometry(self, pos: np.ndarray, n: int, width: int):
        """The window corners on the device (int32 pairs), the frame edge and the object
        width: what the kernels index by."""
        return self.xp.asarray(np.ascontiguousarray(pos, dtype=np.int32)), n, width

    def exit_waves(self, probe, obj, geometry):
        pos, n, _ = geometry
        out = self.xp.empty((len(pos), n, n), dtype=np.complex64)
        self._stack("exit_waves", geometry, probe, obj, pos, out)
        return out

    def dm_prepare(self, psi, probe, obj, geometry, buf) -> None:
        self._stack("dm_prepare", geometry, psi, probe, obj, geometry[0], buf)

    def raar_prepare(self, psi, w, probe, obj, geometry, beta: float, buf) -> None:
        pos = geometry[0]
        self._stack("raar_prepare", geometry, psi, w, probe, obj, pos, np.float32(beta), buf)

    def fft(self, buf, forward: bool) -> None:
        from cupy.cuda import cufft

        plan = self._plans.get(buf.shape)
        if plan is None:
            import cupyx.scipy.fftpack

            plan = cupyx.scipy.fftpack.get_fft_plan(buf, axes=(-2, -1), value_type="C2C")
            self._plans = {buf.shape: plan}  # one stack per backend: keep only its plan
        plan.fft(buf, buf, cufft.CUFFT_FORWARD if forward else cufft.CUFFT_INVERSE)

    def modulus(self, buf, amp):
        err = self.xp.zeros((), dtype=np.float64)
        inv_n = np.float32(1 / buf.shape[-1])
        self._launch("modulus", buf.size, buf, amp, np.int64(buf.size), inv_n, err)
        return err

    def dm_finish(self, psi, probe, obj, geometry, buf, obj_num) -> None:
        self._stack("dm_finish", geometry, psi, probe, obj, geometry[0], buf, obj_num)

    def raar_finish(self, psi, w, probe, geometry, buf, obj_num) -> None:
        self._stack("raar_finish", geometry, psi, w, probe, geometry[0], buf, obj_num)

    def illumination(self, probe, geometry, obj_den) -> None:
        self._stack("illumination", geometry, probe, geometry[0], obj_den)

    def probe_sums(self, target, obj, geometry):
        pos, n, width = geometry
        groups = max(1, min(PROBE_GROUPS, len(pos)))
        num = self.xp.empty((groups, n, n), dtype=np.complex64)
        den = self.xp.empty((groups, n, n), dtype=np.float32)
        args = (target, obj, pos, num, den, np.int32(len(pos)), np.int32(n), np.int32(width))
        self._launch("probe_sums", num.size, *args, np.int32(groups))
        return num.sum(axis=0), den.sum(axis=0)
