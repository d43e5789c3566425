"""The PSF of a decorrelated difference image, evaluated wherever it is asked for.

Decorrelation filters the difference with φ (DMTN-021), so its PSF is ``φ ⊗ P(x, y)`` where ``P`` is the
PSF of the image that was not convolved (the science PSF when the template was matched). ``P`` may vary across
the field; a single PSF image at the centre (what LSST's 2023 task stored) is wrong elsewhere by as much as the
PSF varies. :class:`DecorrelatedPsf` keeps the underlying model and applies φ on demand, caching kernel images
on a coarse grid of positions. When φ itself varies (``doSpatiallyVarying``: filters on a grid of nodes,
blended bilinearly across the image) it blends ``φ_node ⊗ P`` with the image's own weights.

Measurement asks for thousands of PSF images at once; :meth:`DecorrelatedPsf.kernel_images` serves them from
the node cache and computes the missing nodes in one batch (base PSF evaluated for all of them at once when
the base model can, φ̂ built once, one stacked FFT), which is what makes measuring ~2,000 DIA sources cheap.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as sfft

from .decorrelation import DecorrelationNodes, _filter_psf_stack, _phi_lags, decorrelation_kernel_fourier
from .errors import PsfError
from .model.psf import Psf, psf_type_registry, register_psf_type

__all__ = ["DecorrelatedPsf"]


@register_psf_type
class DecorrelatedPsf(Psf):
    """``φ ⊗ base`` with φ the AL decorrelation filter of a matching kernel and two variances.

    Parameters
    ----------
    base
        PSF of the un-convolved image (spatially varying or not).
    kernel_image
        PSF-matching kernel image κ used to build φ (at the image centre).
    svar, tvar
        Mean variances of the science and the (un-convolved) template.
    template_matched
        True if the template was convolved.
    preconv_kernel
        Pre-convolution kernel (score-image mode), or None.
    cache_step
        Kernel images are computed at positions rounded to this many pixels (the PSF varies slowly).
    nodes
        For a spatially varying decorrelation (``doSpatiallyVarying``), the grid its filters were built on
        (:func:`~diffim.decorrelation.spatial_decorrelation_nodes`): the PSF at a position is then the bilinear
        blend of ``φ_node ⊗ base`` over the surrounding nodes, as the image was blended; ``kernel_image``,
        ``svar`` and ``tvar`` are the centre's, kept for reference. Without it one φ (the centre's) is used
        everywhere.
    """

    psf_type = "DECORRELATED"

    def __init__(self, base: Psf, kernel_image: np.ndarray, svar: float, tvar: float, *,
                 template_matched: bool = True, preconv_kernel: np.ndarray | None = None,
                 cache_step: float = 32.0, nodes: DecorrelationNodes | None = None) -> None:
        super().__init__(base._average_position)
        self.base = base
        self.kernel = np.asarray(kernel_image, dtype=float)
        self.svar = float(svar)
        self.tvar = float(tvar)
        self.template_matched = bool(template_matched)
        self.preconv_kernel = None if preconv_kernel is None else np.asarray(preconv_kernel, dtype=float)
        self.cache_step = float(cache_step)
        self.nodes = nodes
        self._images: dict[tuple[float, float], np.ndarray] = {}
        self._shapes: dict[tuple[float, float], tuple[float, float, float]] = {}
        self._phi: dict[tuple[int, int], tuple] = {}

    #: Node images kept at most (a 4096² image at a 32-px step has 16k nodes; ~2k sources touch ~2k of them).
    max_cached_nodes = 8192

    def _cache_position(self, x, y):
        """Cache-grid positions of ``x, y`` (arrays): the positions rounded to ``cache_step``."""
        s = self.cache_step
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        if s > 0:
            x, y = s * np.floor(x / s + 0.5), s * np.floor(y / s + 0.5)
        return x, y

    def _phi_for(self, pshape: tuple[int, int], node: tuple[int, int] | None = None
                 ) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
        """FFT grid, φ̂ and φ's lag window for base PSF images of ``pshape`` (as :func:`decorrelate_psf`
        builds them), cached; φ of grid node ``(i, j)`` of :attr:`nodes`, or the centre's for None."""
        key = (pshape, node)
        if key not in self._phi:
            if node is None:
                kern, svar, tvar = self.kernel, self.svar, self.tvar
            else:
                i, j = node
                kern = self.nodes.kernels[i, j]
                svar, tvar = float(self.nodes.svar[i, j]), float(self.nodes.tvar[i, j])
            shapes = [pshape, kern.shape] + ([self.preconv_kernel.shape] if self.preconv_kernel is not None else [])
            ny = sum(int(t[0]) for t in shapes)
            nx = sum(int(t[1]) for t in shapes)
            shape = (sfft.next_fast_len(4 * ny, real=True), sfft.next_fast_len(4 * nx, real=True))
            phi = decorrelation_kernel_fourier(kern, svar, tvar, shape, self.preconv_kernel,
                                               template_matched=self.template_matched, workers=1)
            self._phi[key] = (shape, phi, _phi_lags(phi, shape, pshape))
        return self._phi[key]

    def _base_kernels(self, xs: np.ndarray, ys: np.ndarray) -> list[np.ndarray]:
        """Unit-sum base PSF kernel images at ``xs, ys`` (batched when the base model offers it)."""
        base = self.base
        stack = None
        if hasattr(base, "kernel_images"):
            stack = np.asarray(base.kernel_images(xs, ys), dtype=float)
        elif hasattr(base, "stamps") and hasattr(base, "size"):
            # Analytic models (diffim.testing): stamps(x, y, 0, 0) is exactly their kernel image at (x, y).
            stack = np.asarray(base.stamps(xs, ys, 0.0, 0.0), dtype=float)
        if stack is not None and stack.ndim == 3 and len(stack) == len(xs):
            s = stack.sum(axis=(1, 2), keepdims=True)
            if np.all(np.isfinite(s)) and np.all(s != 0):
                return list(stack / s)
        return [base.compute_kernel_image(float(a), float(b)) for a, b in zip(xs, ys)]

    def _fill(self, xs: np.ndarray, ys: np.ndarray) -> None:
        """Compute and cache the kernel images of the (cache-grid rounded) positions not cached yet."""
        keys = list(dict.fromkeys(zip(xs.tolist(), ys.tolist())))
        missing = [k for k in keys if k not in self._images]
        if not missing:
            return
        if len(self._images) + len(missing) > self.max_cached_nodes:
            self._images.clear()
            self._shapes.clear()
            missing = keys
        mx = np.array([k[0] for k in missing])
        my = np.array([k[1] for k in missing])
        bases = self._base_kernels(mx, my)
        if self.nodes is None:
            terms = [(None, np.arange(len(missing)), np.ones(len(missing)))]
        else:
            # Each position blends the filters of up to four grid nodes: filter, per node, the base images of
            # the positions that node weighs on.
            acc: dict[tuple[int, int], list] = {}
            for i, j, w in self.nodes.weights(mx, my):
                for n in np.flatnonzero(w > 0):
                    acc.setdefault((int(i[n]), int(j[n])), []).append((n, float(w[n])))
            terms = [(node, np.array([n for n, _ in v]), np.array([w for _, w in v])) for node, v in acc.items()]
        blended: dict[int, np.ndarray] = {}
        for node, members, weights in terms:
            by_shape: dict[tuple[int, int], list[int]] = {}
            for m in range(len(members)):
                by_shape.setdefault(bases[members[m]].shape, []).append(m)
            for pshape, ms in by_shape.items():
                shape, phi, lags = self._phi_for(pshape, node)
                for lo in range(0, len(ms), 512):  # bounded FFT stacks
                    part = ms[lo : lo + 512]
                    out = _filter_psf_stack(np.stack([bases[members[m]] for m in part]), phi, shape, 1, lags)
                    for m, img in zip(part, out):
                        k = int(members[m])
                        blended[k] = blended[k] + weights[m] * img if k in blended else weights[m] * img
        for k, img in blended.items():
            img = np.ascontiguousarray(img)
            img.setflags(write=False)
            self._images[missing[k]] = img

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        nx, ny = self._cache_position(x, y)
        key = (float(nx), float(ny))
        if key not in self._images:
            self._fill(np.array([key[0]]), np.array([key[1]]))
        return self._images[key]

    def kernel_images(self, x, y) -> np.ndarray:
        """Kernel images (unit sum) at many positions: ``(n, ny, nx)``, zero-padded to the largest size."""
        nx, ny = self._cache_position(np.atleast_1d(x), np.atleast_1d(y))
        self._fill(nx, ny)
        imgs = [self._images[k] for k in zip(nx.tolist(), ny.tolist())]
        if not imgs:
            k = self.compute_kernel_image()
            return np.zeros((0,) + k.shape)
        hy = max(im.shape[0] for im in imgs)
        hx = max(im.shape[1] for im in imgs)
        if all(im.shape == (hy, hx) for im in imgs):
            return np.stack(imgs)
        out = np.zeros((len(imgs), hy, hx))
        for i, im in enumerate(imgs):
            oy, ox = (hy - im.shape[0]) // 2, (hx - im.shape[1]) // 2
            out[i, oy : oy + im.shape[0], ox : ox + im.shape[1]] = im
        return out

    def compute_shapes(self, x, y) -> np.ndarray:
        """``(n, 3)`` second moments ``(ixx, iyy, ixy)`` at many positions (as :meth:`compute_shape`), the
        missing nodes measured in one vectorised adaptive-moment iteration."""
        nx, ny = self._cache_position(np.atleast_1d(x), np.atleast_1d(y))
        keys = list(zip(nx.tolist(), ny.tolist()))
        missing = list(dict.fromkeys(k for k in keys if k not in self._shapes))
        if missing:
            mx = np.array([k[0] for k in missing])
            my = np.array([k[1] for k in missing])
            imgs = self.kernel_images(mx, my)
            for k, m in zip(missing, _kernel_moments_stack(imgs)):
                self._shapes[k] = tuple(float(v) for v in m)
        return np.array([self._shapes[k] for k in keys], dtype=float).reshape(-1, 3)

    def compute_shape(self, x: float | None = None, y: float | None = None) -> tuple[float, float, float]:
        """Second moments of the kernel image at ``(x, y)``; cached per node like the images."""
        x, y = self._position(x, y)
        nx, ny = self._cache_position(x, y)
        key = (float(nx), float(ny))
        if key not in self._shapes:
            self._shapes[key] = super().compute_shape(x, y)
        return self._shapes[key]

    def to_fits_hdus(self) -> list:
        from astropy.io import fits

        base_hdus = self.base.to_fits_hdus()
        head = fits.ImageHDU(self.kernel, name="PSF")
        head.header["PSFTYPE"] = self.psf_type
        head.header["SVAR"] = self.svar
        head.header["TVAR"] = self.tvar
        head.header["TMATCHED"] = self.template_matched
        head.header["CACHESTP"] = self.cache_step
        head.header["NBASEHDU"] = len(base_hdus)
        hdus = [head]
        if self.preconv_kernel is not None:
            head.header["HASPRECV"] = True
            hdus.append(fits.ImageHDU(self.preconv_kernel, name="PSF_PRECONV"))
        if self.nodes is not None:
            nyn, nxn = self.nodes.shape
            head.header["NODESNY"], head.header["NODESNX"] = nyn, nxn
            kernels = np.asarray(self.nodes.kernels, float)
            kern = fits.ImageHDU(kernels.reshape((nyn * nxn,) + kernels.shape[2:]), name="PSF_NODEKERN")
            par = np.zeros((nyn * nxn, 4))
            yy, xx = np.meshgrid(self.nodes.y, self.nodes.x, indexing="ij")
            par[:, 0], par[:, 1] = xx.ravel(), yy.ravel()
            par[:, 2], par[:, 3] = np.ravel(self.nodes.svar), np.ravel(self.nodes.tvar)
            hdus += [kern, fits.ImageHDU(par, name="PSF_NODEPAR")]  # columns x, y, svar, tvar
        base_hdus[0].header["NPSFHDU"] = len(base_hdus)
        for h in base_hdus:
            h.name = "PSF_BASE"
        return hdus + base_hdus

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "DecorrelatedPsf":
        h = hdus[0].header
        i = 1
        pre = None
        if h.get("HASPRECV", False):
            pre = np.asarray(hdus[1].data, float)
            i = 2
        nodes = None
        if "NODESNY" in h:
            nyn, nxn = int(h["NODESNY"]), int(h["NODESNX"])
            kern = np.asarray(hdus[i].data, float)
            par = np.asarray(hdus[i + 1].data, float)
            if kern.shape[0] != nyn * nxn or par.shape != (nyn * nxn, 4):
                raise PsfError(f"DECORRELATED PSF: node HDUs hold {kern.shape[0]} kernels and {par.shape} "
                               f"parameters for a {nyn}×{nxn} grid")
            nodes = DecorrelationNodes(x=par[:nxn, 0].copy(), y=par[::nxn, 1].copy(),
                                       kernels=kern.reshape((nyn, nxn) + kern.shape[1:]),
                                       svar=par[:, 2].reshape(nyn, nxn), tvar=par[:, 3].reshape(nyn, nxn))
            i += 2
        base_hdus = hdus[i : i + int(h["NBASEHDU"])]
        ptype = base_hdus[0].header.get("PSFTYPE")
        registry = psf_type_registry()
        if ptype not in registry:
            raise PsfError(f"unknown base PSFTYPE {ptype!r} in a DECORRELATED PSF")
        base = registry[ptype].from_fits_hdus(base_hdus)
        return cls(base, np.asarray(hdus[0].data, float), h["SVAR"], h["TVAR"], template_matched=bool(h["TMATCHED"]),
                    preconv_kernel=pre, cache_step=float(h.get("CACHESTP", 32.0)), nodes=nodes)

    def __repr__(self) -> str:
        grid = "" if self.nodes is None else f", nodes={self.nodes.shape[0]}×{self.nodes.shape[1]}"
        return f"DecorrelatedPsf(base={self.base!r}{grid})"


def _kernel_moments_stack(imgs: np.ndarray, max_iter: int = 100, tol: float = 1e-6) -> np.ndarray:
    """:func:`diffim.model.psf.kernel_moments` of every image of a stack ``(n, ny, nx)`` at once: ``(n, 3)``.

    The same iteration per image (weight covariance iterated to twice the weighted moments, the same break
    conditions and tolerance); images leave the iteration independently. Images without positive pixels go
    through the scalar function (which raises :class:`~diffim.errors.PsfError`).
    """
    from .model.psf import kernel_moments

    imgs = np.asarray(imgs, dtype=float)
    n, ny, nx = imgs.shape
    yy, xx = np.mgrid[:ny, :nx]
    x = (xx - (nx - 1) / 2.0)[None]
    y = (yy - (ny - 1) / 2.0)[None]
    pos = np.clip(imgs, 0, None)
    tot = pos.sum(axis=(1, 2))
    if np.any(tot <= 0):
        return np.array([kernel_moments(im) for im in imgs], dtype=float).reshape(-1, 3)
    cxx = np.maximum((pos * x * x).sum(axis=(1, 2)) / tot, 0.25)
    cyy = np.maximum((pos * y * y).sum(axis=(1, 2)) / tot, 0.25)
    cxy = (pos * x * y).sum(axis=(1, 2)) / tot
    active = np.arange(n)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(max_iter):
            if active.size == 0:
                break
            a_xx, a_yy, a_xy = cxx[active], cyy[active], cxy[active]
            det = a_xx * a_yy - a_xy * a_xy
            ok = det > 0
            det = np.where(ok, det, 1.0)
            ixx_, iyy_, ixy_ = a_yy / det, a_xx / det, -a_xy / det
            w = np.exp(-0.5 * (ixx_[:, None, None] * x * x + iyy_[:, None, None] * y * y
                               + 2 * ixy_[:, None, None] * x * y)) * imgs[active]
            sw = w.sum(axis=(1, 2))
            ok &= sw > 0
            sw = np.where(sw > 0, sw, 1.0)
            qxx = (w * x * x).sum(axis=(1, 2)) / sw
            qyy = (w * y * y).sum(axis=(1, 2)) / sw
            qxy = (w * x * y).sum(axis=(1, 2)) / sw
            dq = qxx * qyy - qxy * qxy
            ok &= dq > 0
            dq = np.where(dq > 0, dq, 1.0)
            a = qyy / dq - ixx_
            b = qxx / dq - iyy_
            c = -qxy / dq - ixy_
            dc = a * b - c * c
            ok &= (dc > 0) & (a > 0)
            dc = np.where(dc > 0, dc, 1.0)
            nxx, nyy, nxy = b / dc, a / dc, -c / dc
            done = ((np.abs(nxx - a_xx) < tol * a_xx) & (np.abs(nyy - a_yy) < tol * a_yy)
                    & (np.abs(nxy - a_xy) < tol * (a_xx + a_yy)))
            upd = active[ok]
            cxx[upd], cyy[upd], cxy[upd] = nxx[ok], nyy[ok], nxy[ok]
            active = active[ok & ~done]  # a failed step stops that image with its previous moments
    return np.stack([cxx, cyy, cxy], axis=1)
