"""Visual features: fixed face-appearance descriptors from OpenCV's bundled Haar cascade.

Per sampled frame: largest frontal face -> grey crop resized to `crop_size` and
histogram-equalised -> HOG (shape of brows/eyes/mouth) + uniform-LBP histogram
(texture) + normalised face box and detection flag (geometry) + crop difference
energy to the previous sampled frame (motion). Frames pooled into `segments`
time segments (mean). The descriptor is fixed (no PCA or other fitted step), so
nothing is learnt from data here and nothing can leak across splits.

Frames where the cascade misses reuse the nearest detected box (faces move little
between frames); the per-clip detection rate is kept in the summary vector and in
the failures report, so a low rate is visible instead of hidden.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from features.base import ClipError, ClipFeatures, Extractor, pool_segments

DEFAULTS: dict[str, Any] = {
    "detector": "haar",
    "crop_size": 64,
    "segments": 16,
    "max_frames": 60,
    "hog_cell": 16,  # HOG cell in crop pixels; blocks are 2x2 cells, stride one cell
    "hog_bins": 9,
    "lbp_grid": 1,  # LBP histograms over a grid x grid split of the crop
    "min_face_share": 0.2,  # smallest face side as a share of the shorter frame side
    "detect_width": 320,  # frames wider than this are downscaled for detection only
    "black_level": 10.0,  # mean grey (0-255) below which a frame counts as black
}
GEOMETRY = ("face_cx", "face_cy", "face_w", "face_h", "face_detected", "motion")


def _uniform_lbp_table() -> np.ndarray:
    """Map each 8-bit LBP code to one of 59 bins: 58 uniform patterns + 1 for the rest."""
    table = np.full(256, 58, dtype=np.int64)
    nxt = 0
    for code in range(256):
        bits = [(code >> k) & 1 for k in range(8)]
        if sum(bits[k] != bits[(k + 1) % 8] for k in range(8)) <= 2:
            table[code] = nxt
            nxt += 1
    return table


LBP_TABLE = _uniform_lbp_table()
LBP_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))  # circular order


def lbp_histograms(crop: np.ndarray, grid: int) -> np.ndarray:
    """Normalised uniform LBP (P=8, R=1) histograms over a grid of cells, concatenated."""
    c = crop.astype(np.int16)
    centre = c[1:-1, 1:-1]  # (H-2, W-2)
    code = np.zeros(centre.shape, dtype=np.int64)
    h, w = c.shape
    for k, (dy, dx) in enumerate(LBP_OFFSETS):
        neigh = c[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
        code |= (neigh >= centre).astype(np.int64) << k
    bins = LBP_TABLE[code]
    hists = []
    for rows in np.array_split(bins, grid, axis=0):
        for cell in np.array_split(rows, grid, axis=1):
            hist = np.bincount(cell.ravel(), minlength=59).astype(np.float32)
            hists.append(hist / max(cell.size, 1))
    return np.concatenate(hists)


class VisualExtractor(Extractor):
    modality = "visual"
    version = 1
    defaults = DEFAULTS
    preload = ("features.visual", "cv2")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if self.config["detector"] != "haar":
            raise ValueError(f"unknown face detector {self.config['detector']!r} (only 'haar')")
        size, cell = int(self.config["crop_size"]), int(self.config["hog_cell"])
        if size % cell or size < 2 * cell:
            raise ValueError(f"crop_size {size} must be a multiple of hog_cell {cell} and at least 2 cells")
        self._cascade = None
        self._hog = None

    def setup(self) -> None:
        import cv2

        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"{path}: cannot load the bundled Haar cascade")
        size, cell = int(self.config["crop_size"]), int(self.config["hog_cell"])
        self._hog = cv2.HOGDescriptor((size, size), (2 * cell, 2 * cell), (cell, cell), (cell, cell), int(self.config["hog_bins"]))

    def _dims(self) -> tuple[int, int]:
        blocks = int(self.config["crop_size"]) // int(self.config["hog_cell"]) - 1
        hog = blocks * blocks * 4 * int(self.config["hog_bins"])
        lbp = 59 * int(self.config["lbp_grid"]) ** 2
        return hog, lbp

    @property
    def seq_shape(self) -> tuple[int, int]:
        hog, lbp = self._dims()
        return int(self.config["segments"]), hog + lbp + len(GEOMETRY)

    @property
    def feature_names(self) -> list[str]:
        hog, lbp = self._dims()
        return [f"hog_{i}" for i in range(hog)] + [f"lbp_{i}" for i in range(lbp)] + list(GEOMETRY)

    @property
    def summary_names(self) -> list[str]:
        return [f"{n}_mean" for n in self.feature_names] + [f"{n}_std" for n in GEOMETRY] + ["face_rate"]

    def extract(self, path: Path) -> ClipFeatures:
        import cv2

        self.ensure_setup()
        path = Path(path)
        frames = read_frames(path, int(self.config["max_frames"]))
        greys = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) if f.ndim == 3 else f for f in frames]
        if all(float(g.mean()) < float(self.config["black_level"]) for g in greys):
            raise ClipError("black_video", path, f"all {len(greys)} sampled frames are black")
        boxes = [self._largest_face(g) for g in greys]
        detected = np.array([b is not None for b in boxes])
        if not detected.any():
            raise ClipError("no_face", path, f"no frontal face in {len(greys)} sampled frames")
        filled = _fill_boxes(boxes)
        size = int(self.config["crop_size"])
        rows, prev = [], None
        for grey, box, hit in zip(greys, filled, detected):
            x, y, w, h = box
            crop = cv2.equalizeHist(cv2.resize(grey[y : y + h, x : x + w], (size, size), interpolation=cv2.INTER_AREA))
            hog = self._hog.compute(crop).ravel()
            lbp = lbp_histograms(crop, int(self.config["lbp_grid"]))
            motion = 0.0 if prev is None else float(np.abs(crop.astype(np.float32) - prev).mean() / 255.0)
            prev = crop.astype(np.float32)
            fh, fw = grey.shape
            geom = [(x + w / 2) / fw, (y + h / 2) / fh, w / fw, h / fh, float(hit), motion]
            rows.append(np.concatenate([hog, lbp, np.asarray(geom, np.float32)]))
        desc = np.stack(rows).astype(np.float32)  # (frames, d)
        seq, length = pool_segments(desc, int(self.config["segments"]))
        rate = float(detected.mean())
        geom_std = desc[:, -len(GEOMETRY) :].std(axis=0)
        summary = np.concatenate([desc.mean(axis=0), geom_std, [rate]]).astype(np.float32)
        return ClipFeatures(sequence=seq, length=length, summary=summary, extras={"face_rate": rate, "frames": float(len(greys))})

    def _largest_face(self, grey: np.ndarray) -> tuple[int, int, int, int] | None:
        import cv2

        fh, fw = grey.shape
        scale = min(1.0, float(self.config["detect_width"]) / fw)
        small = cv2.resize(grey, (int(fw * scale), int(fh * scale))) if scale < 1.0 else grey
        side = max(12, int(float(self.config["min_face_share"]) * min(small.shape)))
        faces = self._cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=4, minSize=(side, side))
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda b: b[2] * b[3])
        x, y, w, h = (int(round(v / scale)) for v in (x, y, w, h))
        return max(0, x), max(0, y), min(w, fw - max(0, x)), min(h, fh - max(0, y))


def _fill_boxes(boxes: list) -> list[tuple[int, int, int, int]]:
    """Replace misses by the nearest earlier detection (the first detection for leading misses)."""
    first = next(b for b in boxes if b is not None)
    out, last = [], first
    for b in boxes:
        last = b if b is not None else last
        out.append(last)
    return out


def read_frames(path: Path, max_frames: int) -> list[np.ndarray]:
    """At most `max_frames` frames sampled evenly over the clip, or ClipError."""
    import cv2

    if path.stat().st_size == 0:
        raise ClipError("unreadable_video", path, "zero-byte file")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            if _has_empty_container(path):
                raise ClipError("no_video_frames", path, "valid container without decodable frames")
            raise ClipError("unreadable_video", path, "OpenCV cannot open the file")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(0, count - 1, min(count, max_frames)).round().astype(int).tolist()) if count > 0 else None
        frames, index = [], 0
        while cap.grab():
            if wanted is None or index in wanted:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    frames.append(frame)
            index += 1
            if wanted is not None and index > max(wanted):
                break
    finally:
        cap.release()
    if not frames:
        raise ClipError("no_video_frames", path, "no decodable frames")
    if len(frames) > max_frames:  # frame count was unknown: subsample what we read
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def _has_empty_container(path: Path) -> bool:
    """True for an ISO-BMFF (mp4/mov) file with a complete box structure (ftyp + moov).

    Such a file is well-formed but holds no frames (a writer opened and closed with
    nothing written); anything else that OpenCV cannot open is unreadable.
    """
    data = path.read_bytes()[: 1 << 20]
    pos, seen = 0, set()
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size < 8:
            break
        seen.add(kind)
        pos += size
    return {b"ftyp", b"moov"} <= seen
