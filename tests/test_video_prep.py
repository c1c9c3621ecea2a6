"""A video's kept frame as the image tower sees it: the picture of its scene, turned as the video
is shown, prepared like a photo of that picture (FFmpeg resizes video frames; see
loaders.video._prepared)."""

from __future__ import annotations

import numpy as np
import pytest
from videos import make_video, picture

from mmsearch.config import ImagePrep
from mmsearch.loaders.image import resize_crop
from mmsearch.loaders.video import iter_shots

SIZE = (320, 192)  # stored width, height: shrunk on the way to the tower
PREP = ImagePrep(size=(32, 32))


def _photo(scene, quarter: int, prep: ImagePrep = PREP) -> np.ndarray:
    """The scene's picture turned `quarter` quarter turns counter-clockwise, prepared as a photo."""
    from PIL import Image

    return resize_crop(Image.fromarray(np.rot90(picture(scene, SIZE), quarter).copy()), prep)


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=int) - b).mean())


@pytest.mark.parametrize("rotation", [None, 90, -90, 180])
def test_kept_frame_is_the_scene_turned_as_shown(tmp_path, rotation):
    p = make_video(tmp_path / "clip.mkv", [(7, 1)], size=SIZE, rotation=rotation, tone=None)
    (shot,) = iter_shots(p, PREP)
    assert shot.frame.dtype == np.uint8 and shot.frame.shape == (32, 32, 3)
    shown = ((rotation or 0) % 360) // 90
    diffs = [_diff(shot.frame, _photo(7, q)) for q in range(4)]
    # Like a photo of the picture turned as shown (within codec loss), and no other turn.
    assert diffs[shown] < 12 and diffs[shown] == min(diffs)
    assert sorted(diffs)[1] > 2 * diffs[shown]


@pytest.mark.parametrize("rotation", [None, -90])
def test_ffmpeg_resize_is_within_a_level_of_pils(tmp_path, rotation):
    # The same frame shrunk the same way first, then resized by swscale or by PIL (the path of
    # photos, and of video frames before): about one level apart on random 8x8 blocks (the
    # hardest case), where the first shrink itself moves them 4 levels from a full-size resize.
    import av
    from av.video.reformatter import VideoReformatter

    from mmsearch.loaders.video import _prepared, _shown

    p = make_video(tmp_path / "clip.mkv", [(3, 1)], size=SIZE, rotation=rotation, tone=None)
    with av.open(str(p)) as c:
        frame = next(c.decode(video=0))
    fast = _prepared(frame, (VideoReformatter(), VideoReformatter()), 107, 64, PREP)
    assert fast.shape == (32, 32, 3) and fast.flags.c_contiguous
    assert _diff(fast, resize_crop(_shown(frame, VideoReformatter(), 107, 64), PREP)) < 1.5
    assert _diff(fast, resize_crop(_shown(frame, VideoReformatter(), *SIZE), PREP)) < 6


def test_other_filters_and_exact_prep_take_pils_path(tmp_path):
    p = make_video(tmp_path / "clip.mkv", [(3, 1)], size=SIZE, rotation=90, tone=None)
    for prep in (
        ImagePrep(size=(32, 32), interpolation="bilinear"),
        ImagePrep(size=(32, 32), draft=False),
    ):
        (shot,) = iter_shots(p, prep)
        assert _diff(shot.frame, _photo(3, 1, prep)) < 12
