"""The lesions of diabetic retinopathy, drawn at their physical sizes on a background (:class:`LesionPainter`),
and which of them a photo of each grade gets (:func:`draw_lesions`).

Every lesion is area-integrated from a supersampled patch, so a lesion smaller than a pixel darkens that pixel
by the fraction of light it really removes; every lesion drawn is recorded (kind, position, size, quadrant).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from retina_scale.data.synthetic.anatomy import Anatomy, quadrant_of
from retina_scale.data.synthetic.drawing import (blend_patch, integrate, multiply_patch, patch_grid, polyline,
                                                 smooth_noise)
from retina_scale.data.synthetic.plan import LESION_SIZE_UM, QUADRANTS

# Calibration against skimage.data.microaneurysms() (green channel), measured with measure_dark_spot():
# the two microaneurysms in that detail have relative depths 0.654 and 0.414 and Gaussian FWHMs of 3.91 and
# 3.47 px, with a Gaussian-fit RMS residual of 7.6 % and 9.1 % of their depth. tests/data/test_synthetic.py
# re-measures the real detail and a drawn microaneurysm and compares them.
MA_GREEN_DEPTH = (0.41, 0.65)
"""Peak relative darkening of a microaneurysm in the green channel (before pixel integration)."""

# Relative darkening per channel (R, G, B) of blood, as a fraction of the green-channel darkening: blood
# absorbs green and blue strongly and red weakly, which is why red lesions are clearest in the green channel.
_BLOOD_RGB = np.array([0.28, 1.0, 0.8], np.float32)


def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class LesionPainter:
    """Draws lesions on a float RGB image and keeps their records."""

    def __init__(self, rng: np.random.Generator, img: np.ndarray, anat: Anatomy):
        self.rng, self.img, self.anat = rng, img, anat
        self.records: list[dict] = []
        self._cluster = 0

    # -- placement ------------------------------------------------------------------------------------
    def _inside(self, x, y, margin_px):
        a = self.anat
        return math.hypot(x - a.centre[0], y - a.centre[1]) < a.radius * 0.93 - margin_px

    def _off_disc(self, x, y, factor=0.75):
        a = self.anat
        return math.hypot(x - a.disc[0], y - a.disc[1]) > a.disc_diameter * factor

    def position(self, region="posterior", quadrant=None, margin_px=0.0):
        """A random lesion position: 'posterior' (macula-weighted), 'anywhere' or inside one quadrant."""
        a, rng = self.anat, self.rng
        for _ in range(200):
            if region == "posterior":
                r = abs(rng.normal(0, 2.2 * a.disc_diameter))
                t = rng.uniform(0, 2 * math.pi)
                x, y = a.fovea[0] + r * math.cos(t), a.fovea[1] + r * math.sin(t) * 0.85
            else:
                r = a.radius * math.sqrt(rng.uniform(0, 1))
                t = rng.uniform(0, 2 * math.pi)
                x, y = a.centre[0] + r * math.cos(t), a.centre[1] + r * math.sin(t)
            if quadrant is not None and quadrant_of(a, x, y) != quadrant:
                continue
            if self._inside(x, y, margin_px) and self._off_disc(x, y):
                return x, y
        # fall back to the middle of the quadrant / the fovea
        if quadrant is not None:
            sx = -1 if "temporal" in quadrant else 1
            sy = -1 if quadrant.startswith("supero") else 1
            return a.centre[0] + sx * a.radius * 0.4, a.centre[1] + sy * a.radius * 0.4
        return a.fovea

    def vessel_point(self, near=None, max_dist=None, veins_only=False, min_width=0.0):
        """A vessel centre-line sample (x, y, dx, dy, width, vein), optionally near a point."""
        v = self.anat.vessels
        ok = np.ones(len(v), bool)
        if veins_only:
            ok &= v[:, 5] > 0.5
        ok &= v[:, 4] >= min_width
        a = self.anat
        ok &= (v[:, 0] - a.centre[0]) ** 2 + (v[:, 1] - a.centre[1]) ** 2 < (0.85 * a.radius) ** 2
        if near is not None:
            d = np.hypot(v[:, 0] - near[0], v[:, 1] - near[1])
            ok &= d < max_dist
        idx = np.nonzero(ok)[0]
        if len(idx) == 0:
            return None
        return v[self.rng.choice(idx)]

    def _record(self, kind, x, y, size_px, depth, cluster=-1):
        lo, hi = LESION_SIZE_UM[kind]
        size_um = size_px * self.anat.um_per_px
        assert lo - 1e-6 <= size_um <= hi + 1e-6, (kind, size_um)
        self.records.append(dict(kind=kind, x=float(x), y=float(y), size_px=float(size_px),
                                 size_um=float(size_um), quadrant=quadrant_of(self.anat, x, y),
                                 depth=float(depth), cluster=int(cluster)))

    def _size_px(self, kind, log=True, lo=None, hi=None):
        klo, khi = LESION_SIZE_UM[kind]
        lo = klo if lo is None else max(lo, klo)
        hi = khi if hi is None else min(hi, khi)
        um = _log_uniform(self.rng, lo, hi) if log else self.rng.uniform(lo, hi)
        return self.anat.px(um)

    # -- kinds -----------------------------------------------------------------------------------------
    def microaneurysm(self, x=None, y=None, diameter_px=None, depth=None):
        """Round dark-red dot with a Gaussian profile; FWHM = diameter (calibrated, see MA_GREEN_DEPTH)."""
        if x is None:
            x, y = self.position("posterior")
        d = self._size_px("microaneurysm", lo=25, hi=125) if diameter_px is None else diameter_px
        depth = self.rng.uniform(*MA_GREEN_DEPTH) if depth is None else depth
        sigma = d / 2.3548
        x0, y0, w, h, f, X, Y = patch_grid(x, y, 3 * sigma)
        alpha = np.exp(-(X * X + Y * Y) / (2 * sigma * sigma)) * depth
        multiply_patch(self.img, integrate(alpha, w, h), x0, y0, _BLOOD_RGB)
        self._record("microaneurysm", x, y, d, depth)

    def dot_blot(self, x=None, y=None, quadrant=None):
        """Dot/blot haemorrhage: darker, irregular (union of lobes), slightly soft edge."""
        if x is None:
            x, y = self.position("anywhere" if quadrant else "posterior", quadrant)
        rng = self.rng
        lo, hi = LESION_SIZE_UM["dot_blot_haemorrhage"]
        d = self.anat.px(lo * (hi / lo) ** (rng.uniform(0, 1) ** 1.6))
        r = d / 2
        x0, y0, w, h, f, X, Y = patch_grid(x, y, r)
        field_ = np.full_like(X, -10.0)
        n_lobes = 1 if d < self.anat.px(250) else int(rng.integers(2, 6))
        for i in range(n_lobes):
            if i == 0:
                ox = oy = 0.0
                lr = r * (1.0 if n_lobes == 1 else rng.uniform(0.55, 0.8))
            else:
                t = rng.uniform(0, 2 * math.pi)
                lr = r * rng.uniform(0.3, 0.55)
                ox, oy = (r - lr) * math.cos(t), (r - lr) * math.sin(t)
            e = rng.uniform(0.75, 1.0)
            field_ = np.maximum(field_, 1 - np.sqrt(((X - ox) / lr) ** 2 + ((Y - oy) / (lr * e)) ** 2))
        edge = max(0.06, 0.6 / max(r, 1e-3))
        alpha = 1 / (1 + np.exp(-field_ / edge))
        depth = rng.uniform(0.55, 0.8)
        multiply_patch(self.img, integrate(alpha * depth, w, h), x0, y0, _BLOOD_RGB * [1.6, 1, 1])
        self._record("dot_blot_haemorrhage", x, y, d, depth)

    def flame(self, quadrant=None):
        """Flame haemorrhage: elongated, streaky, in the nerve-fibre layer beside a vessel."""
        rng, a = self.rng, self.anat
        v = None
        for _ in range(20):
            v = self.vessel_point(near=a.disc, max_dist=3.5 * a.disc_diameter)
            if v is not None and (quadrant is None or quadrant_of(a, v[0], v[1]) == quadrant):
                break
            v = None
        if v is None:
            x, y = self.position("anywhere", quadrant)
            dx, dy = (x - a.disc[0]), (y - a.disc[1])
            n = math.hypot(dx, dy) + 1e-9
            v = np.array([x, y, dx / n, dy / n, 0, 0])
        length = self._size_px("flame_haemorrhage")
        width = length * rng.uniform(0.2, 0.35)
        nx, ny = -v[3], v[2]
        off = (v[4] / 2 + width / 2) * (1 if rng.random() < 0.5 else -1)
        x, y = float(v[0] + nx * off), float(v[1] + ny * off)
        if not self._inside(x, y, length / 2):
            x, y = self.position("anywhere", quadrant, margin_px=length / 2)
        x0, y0, w, h, f, X, Y = patch_grid(x, y, length / 2, min_sub=6)
        u = X * v[2] + Y * v[3]
        q = -X * v[3] + Y * v[2]
        taper = np.clip(1 - (u / (length / 2)) ** 2, 0, 1)
        # flame: blunt at the disc end, feathered and pointed at the far end, streaked along its length
        skew = np.clip(1 - (u / (length / 2) + 0.3) ** 2 / 1.69, 0, 1)
        body = np.clip(1 - (q / (width / 2 * (0.1 + 0.9 * skew) + 1e-6)) ** 2, 0, 1)
        streak = 0.8 + 0.2 * np.cos(q * 2 * math.pi / max(width / 3, 1e-3) + rng.uniform(0, 6))
        depth = rng.uniform(0.45, 0.7)
        alpha = taper * body * streak * depth
        multiply_patch(self.img, integrate(alpha, w, h), x0, y0, _BLOOD_RGB * [1.5, 1, 1])
        self._record("flame_haemorrhage", x, y, length, depth)

    def exudate_cluster(self):
        """Hard exudates: yellow-white, sharp-edged, in clumps or a circinate ring near the macula."""
        rng, a = self.rng, self.anat
        self._cluster += 1
        cid = self._cluster
        r = abs(rng.normal(0, 1.2 * a.disc_diameter))
        t = rng.uniform(0, 2 * math.pi)
        cx, cy = a.fovea[0] + r * math.cos(t), a.fovea[1] + r * math.sin(t)
        if not (self._inside(cx, cy, a.px(800)) and self._off_disc(cx, cy, 1.2)):
            cx, cy = a.fovea[0] + a.disc_diameter * 0.8, a.fovea[1] - a.disc_diameter * 0.5
        ring = rng.random() < 0.35
        n = int(rng.integers(8, 30) if ring else rng.integers(1, 12))
        ring_r = a.px(rng.uniform(400, 1500))
        colour = np.array([0.98, 0.92, 0.55], np.float32) * rng.uniform(0.9, 1.02)
        for i in range(n):
            if ring:
                t = 2 * math.pi * i / n + rng.normal(0, 0.15)
                rr = ring_r * rng.uniform(0.9, 1.1)
            else:
                t = rng.uniform(0, 2 * math.pi)
                rr = abs(rng.normal(0, a.px(350)))
            x, y = cx + rr * math.cos(t), cy + rr * math.sin(t)
            if not (self._inside(x, y, 0) and self._off_disc(x, y)):
                continue
            d = self._size_px("hard_exudate", lo=50, hi=300 if ring else 500)
            rad = d / 2
            x0, y0, w, h, f, X, Y = patch_grid(x, y, rad)
            e = rng.uniform(0.6, 1.0)
            th = rng.uniform(0, math.pi)
            u = X * math.cos(th) + Y * math.sin(th)
            q = -X * math.sin(th) + Y * math.cos(th)
            rho = np.sqrt((u / rad) ** 2 + (q / (rad * e)) ** 2)
            jag = 1 + 0.12 * np.sin(np.arctan2(q, u) * rng.integers(3, 7) + rng.uniform(0, 6))
            alpha = 1 / (1 + np.exp((rho - jag) / 0.06))  # sharp edge
            opacity = rng.uniform(0.6, 0.9)
            blend_patch(self.img, integrate(alpha * opacity, w, h), x0, y0, colour)
            self._record("hard_exudate", x, y, d, opacity, cid)

    def cotton_wool(self):
        """Cotton-wool spot: pale, fluffy, soft-edged, near the arcades / disc."""
        rng, a = self.rng, self.anat
        v = self.vessel_point(near=a.disc, max_dist=3.0 * a.disc_diameter)
        if v is not None:
            off = a.px(rng.uniform(150, 500)) * (1 if rng.random() < 0.5 else -1)
            x, y = float(v[0] - v[3] * off), float(v[1] + v[2] * off)
            dirx, diry = float(v[2]), float(v[3])
        else:
            x, y = self.position("posterior")
            dirx, diry = 1.0, 0.0
        d = self._size_px("cotton_wool_spot")
        if not (self._inside(x, y, d) and self._off_disc(x, y, 0.9)):
            x, y = self.position("posterior", margin_px=d)
        x0, y0, w, h, f, X, Y = patch_grid(x, y, d / 2, min_sub=6)
        u = X * dirx + Y * diry
        q = -X * diry + Y * dirx
        rho = np.sqrt((u / (d / 2)) ** 2 + (q / (d / 2 * rng.uniform(0.5, 0.8))) ** 2)
        fluff = smooth_noise(rng, X.shape, 6) * 0.25
        alpha = np.clip(1 - rho + fluff, 0, 1) ** 0.7
        opacity = rng.uniform(0.45, 0.7)
        colour = np.array([0.93, 0.88, 0.80], np.float32)
        blend_patch(self.img, integrate(alpha * opacity, w, h), x0, y0, colour)
        self._record("cotton_wool_spot", x, y, d, opacity)

    def _draw_fine_vessels(self, paths, width_px, depth):
        """Draw thin new vessels (IRMA / NV) as tortuous polylines in a local supersampled patch."""
        allp = np.vstack(paths)
        xmin, ymin = np.floor(allp.min(0)).astype(int) - 3
        xmax, ymax = np.ceil(allp.max(0)).astype(int) + 3
        w, h = xmax - xmin + 1, ymax - ymin + 1
        f = int(min(8, max(2, math.ceil(3.0 / max(width_px, 1e-3)))))
        m = np.zeros((h * f, w * f), np.uint8)
        for p in paths:
            polyline(m, p - [xmin, ymin] + 0.5, width_px, f)
        alpha = integrate(m.astype(np.float32) / 255.0 * depth, w, h)
        multiply_patch(self.img, alpha, int(xmin), int(ymin), _BLOOD_RGB * [1.5, 1, 1])

    def _tortuous(self, start, heading, length, step, wiggle):
        rng = self.rng
        pts = [np.array(start, float)]
        h = heading
        s = 0.0
        while s < length:
            h += rng.normal(0, wiggle)
            pts.append(pts[-1] + step * np.array([math.cos(h), math.sin(h)]))
            s += step
        return np.array(pts)

    def irma(self, quadrant=None):
        """IRMA: fine, tortuous, irregular intraretinal vessels near a vessel (calibre 15-30 um)."""
        rng, a = self.rng, self.anat
        x, y = self.position("anywhere", quadrant, margin_px=a.px(1200))
        extent = self._size_px("irma", lo=300, hi=1100, log=False)
        step = max(0.5, extent / 25)
        paths = []
        for _ in range(int(rng.integers(3, 7))):
            st = (x + rng.normal(0, extent / 6), y + rng.normal(0, extent / 6))
            paths.append(self._tortuous(st, rng.uniform(0, 2 * math.pi), extent * rng.uniform(0.3, 0.6), step, 0.6))
        allp = np.vstack(paths)
        allp = np.clip(allp, [x - extent / 2, y - extent / 2], [x + extent / 2, y + extent / 2])
        paths = [np.clip(p, [x - extent / 2, y - extent / 2], [x + extent / 2, y + extent / 2]) for p in paths]
        self._draw_fine_vessels(paths, a.px(rng.uniform(15, 30)), rng.uniform(0.25, 0.4))
        self._record("irma", x, y, extent, 0.45)

    def _walk_vessel(self, v, length, min_width):
        """Centre-line points from sample ``v`` following the vessel in both directions, up to ``length``."""
        vs = self.anat.vessels
        pts = [np.array(v[:2], float)]
        for sign in (1.0, -1.0):
            p = np.array(v[:2], float)
            d = np.array(v[2:4], float) * sign
            s = 0.0
            step = max(1.0, float(v[4]) * 0.7)
            while s < length / 2:
                q = p + d * step
                d2 = (vs[:, 0] - q[0]) ** 2 + (vs[:, 1] - q[1]) ** 2
                d2[vs[:, 4] < min_width] = np.inf
                j = int(np.argmin(d2))
                if d2[j] > (0.8 * step) ** 2 + 4:
                    break
                nxt = vs[j, :2].astype(float)
                nd = vs[j, 2:4].astype(float)
                if np.dot(nd, d) < 0:
                    nd = -nd
                if np.linalg.norm(nxt - p) < 0.3 * step:
                    break
                s += float(np.linalg.norm(nxt - p))
                p, d = nxt, nd
                if sign > 0:
                    pts.append(p)
                else:
                    pts.insert(0, p)
        pts = np.array(pts)
        total = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1))) if len(pts) > 1 else 0.0
        return pts, total

    def venous_beading(self, quadrant):
        """Venous beading: a stretch of a vein with alternating dilatations and constrictions."""
        rng, a = self.rng, self.anat
        lo, hi = LESION_SIZE_UM["venous_beading"]
        want = a.px(rng.uniform(lo, hi))
        best = None
        for _ in range(30):
            v = self.vessel_point(veins_only=True, min_width=a.px(60))
            if v is None or quadrant_of(a, v[0], v[1]) != quadrant:
                v = self.vessel_point(min_width=a.px(45))
            if v is None or quadrant_of(a, v[0], v[1]) != quadrant:
                continue
            pts, total = self._walk_vessel(v, want, 0.6 * float(v[4]))
            if best is None or total > best[2]:
                best = (v, pts, total)
            if total >= a.px(lo):
                break
        if best is None or best[2] < a.px(lo):
            # no long enough vein in this quadrant: the beaded vein is drawn with it
            x, y = self.position("anywhere", quadrant, margin_px=want / 2)
            t = rng.uniform(0, 2 * math.pi)
            pts = self._tortuous((x, y), t, want, max(1.0, want / 30), 0.05)
            width = a.px(rng.uniform(100, 140))
            self._draw_fine_vessels([pts], width, 0.35)
            v = np.array([x, y, math.cos(t), math.sin(t), width, 1], np.float32)
            total = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
        else:
            v, pts, total = best
        width = max(float(v[4]), a.px(70))
        # beads: one every ~1.6 vein widths along the walked centre-line
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        for t in np.arange(width * 0.8, max(cum[-1], width), width * 1.6):
            bx = float(np.interp(t, cum, pts[:, 0]))
            by = float(np.interp(t, cum, pts[:, 1]))
            r = width * rng.uniform(0.7, 0.9)
            x0, y0, w, h, f, X, Y = patch_grid(bx, by, r)
            alpha = np.exp(-((X / r) ** 2 + (Y / r) ** 2) * 1.5) * rng.uniform(0.3, 0.45)
            multiply_patch(self.img, integrate(alpha, w, h), x0, y0, _BLOOD_RGB * [1.6, 1, 1])
        size = float(np.clip(total, a.px(lo), a.px(hi)))
        # recorded at the sample the walk started from, which lies in the requested quadrant
        self._record("venous_beading", float(v[0]), float(v[1]), size, 0.4)

    def neovascularisation(self, at_disc: bool):
        """NVD / NVE: a tuft of fine, looping, tortuous new vessels at the disc or along a vessel."""
        rng, a = self.rng, self.anat
        if at_disc:
            t = rng.uniform(0, 2 * math.pi)
            rr = a.disc_diameter * rng.uniform(0.0, 0.5)
            x, y = a.disc[0] + rr * math.cos(t), a.disc[1] + rr * math.sin(t)
            kind = "nvd"
        else:
            v = self.vessel_point(min_width=a.px(50))
            if v is not None:
                x, y = float(v[0]), float(v[1])
            else:
                x, y = self.position("anywhere")
            if not self._inside(x, y, a.px(1500)):
                x, y = self.position("anywhere", margin_px=a.px(1500))
            kind = "nve"
        extent = self._size_px(kind, lo=500, hi=2400, log=False)
        step = max(0.4, extent / 40)
        paths = []
        for _ in range(int(rng.integers(5, 12))):
            t = rng.uniform(0, 2 * math.pi)
            p = self._tortuous((x, y), t, extent * rng.uniform(0.3, 0.55), step, 0.45)
            # loops: come back towards the centre
            back = self._tortuous(p[-1], t + math.pi + rng.normal(0, 0.6), extent * 0.3, step, 0.45)
            paths.append(np.vstack([p, back]))
        paths = [np.clip(p, [x - extent / 2, y - extent / 2], [x + extent / 2, y + extent / 2]) for p in paths]
        self._draw_fine_vessels(paths, a.px(rng.uniform(15, 35)), rng.uniform(0.4, 0.6))
        if rng.random() < 0.5:  # fibrous veil around the tuft
            x0, y0, w, h, f, X, Y = patch_grid(x, y, extent / 2, min_sub=4)
            alpha = np.clip(1 - np.sqrt(X * X + Y * Y) / (extent / 2), 0, 1) * rng.uniform(0.1, 0.25)
            blend_patch(self.img, integrate(alpha, w, h), x0, y0, np.array([0.9, 0.85, 0.8], np.float32))
        self._record(kind, x, y, extent, 0.5)

    def preretinal(self):
        """Pre-retinal haemorrhage: a large dark-red area with a flat (fluid-level) upper border."""
        rng, a = self.rng, self.anat
        d = self._size_px("preretinal_haemorrhage", log=False)
        v = self.vessel_point(near=a.fovea, max_dist=2.5 * a.disc_diameter)
        x, y = (float(v[0]), float(v[1])) if v is not None else self.position("posterior")
        if not (self._inside(x, y, d / 2) and self._off_disc(x, y, 0.5)):
            x, y = self.position("posterior", margin_px=d / 2)
        x0, y0, w, h, f, X, Y = patch_grid(x, y, d / 2, min_sub=4)
        rho = np.sqrt((X / (d / 2)) ** 2 + (Y / (d / 2 * rng.uniform(0.6, 0.9))) ** 2)
        level = rng.uniform(-0.4, 0.0) * d / 2
        alpha = 1 / (1 + np.exp((rho - 1) / 0.04)) * (1 / (1 + np.exp((level - Y) / max(0.7, d / 200))))
        depth = rng.uniform(0.75, 0.92)
        multiply_patch(self.img, integrate(alpha * depth, w, h), x0, y0, _BLOOD_RGB * [2.2, 1, 1])
        self._record("preretinal_haemorrhage", x, y, d, depth)

    def vitreous(self):
        """Vitreous haemorrhage: a diffuse dark-red haze veiling part of the field."""
        rng, a = self.rng, self.anat
        d = self._size_px("vitreous_haemorrhage", log=False)
        x, y = self.position("anywhere", margin_px=0)
        H, W = self.img.shape[:2]
        step = max(1, int(d / 64))
        yy, xx = np.mgrid[0:H:step, 0:W:step].astype(np.float32)
        rho = np.sqrt((xx - x) ** 2 + (yy - y) ** 2) / (d / 2)
        noise = smooth_noise(rng, rho.shape, 5)
        alpha = np.clip(1.2 - rho + 0.3 * noise, 0, 1) * rng.uniform(0.4, 0.65)
        alpha = cv2.resize(alpha, (W, H), interpolation=cv2.INTER_LINEAR)
        blurred = cv2.GaussianBlur(self.img, (0, 0), max(1.0, a.px(60)))
        a3 = alpha[..., None]
        self.img[:] = (self.img * (1 - a3) + blurred * a3) * (1 - a3 * _BLOOD_RGB * 0.6)
        self._record("vitreous_haemorrhage", x, y, d, float(alpha.max()))


def draw_lesions(rng: np.random.Generator, img: np.ndarray, anat: Anatomy, grade: int) -> list[dict]:
    p = LesionPainter(rng, img, anat)
    if grade == 0:
        return p.records
    if grade == 1:
        # few, tiny: the class the paper says needs resolution
        for _ in range(int(min(8, 1 + rng.geometric(0.45)))):
            p.microaneurysm()
        return p.records
    n_ma = int(rng.integers(2, 12) if grade == 2 else rng.integers(8, 30))
    for _ in range(n_ma):
        p.microaneurysm()
    if grade == 2:
        signs = [s for s in ("haem", "exudate", "cws", "flame") if rng.random() < 0.5] or ["haem"]
        # each sign present: 1 to (bound - 1) lesions of its kind, drawn in this order
        for sign, bound, paint in (("haem", 15, p.dot_blot), ("flame", 4, p.flame), ("exudate", 3, p.exudate_cluster),
                                   ("cws", 4, p.cotton_wool)):
            if sign in signs:
                for _ in range(int(rng.integers(1, bound))):
                    paint()
        return p.records
    # grades 3 and 4: severe non-proliferative background
    rules = [r for r in ("haem421", "beading", "irma") if rng.random() < 0.45]
    if grade == 3 and not rules:
        rules = [("haem421", "beading", "irma")[int(rng.integers(3))]]
    if "haem421" in rules:
        for q in QUADRANTS:
            for _ in range(int(rng.integers(21, 30))):
                if rng.random() < 0.85:
                    p.dot_blot(quadrant=q)
                else:
                    p.flame(quadrant=q)
    else:
        for _ in range(int(rng.integers(3, 25))):
            p.dot_blot()
    if "beading" in rules:
        for q in rng.permutation(QUADRANTS)[: int(rng.integers(2, 5))]:
            p.venous_beading(str(q))
    if "irma" in rules:
        for q in rng.permutation(QUADRANTS)[: int(rng.integers(1, 3))]:
            p.irma(str(q))
    for _ in range(int(rng.integers(0, 3))):
        p.exudate_cluster()
    for _ in range(int(rng.integers(0, 5))):
        p.cotton_wool()
    if grade == 4:
        signs = [s for s in ("nvd", "nve", "preretinal", "vitreous") if rng.random() < 0.4] or ["nvd"]
        if "nvd" in signs:
            p.neovascularisation(at_disc=True)
        if "nve" in signs:
            for _ in range(int(rng.integers(1, 3))):
                p.neovascularisation(at_disc=False)
        if "preretinal" in signs:
            p.preretinal()
        if "vitreous" in signs:
            p.vitreous()
    return p.records
