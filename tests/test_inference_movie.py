"""Movie reading: lazy (memory map or page by page), channels, frame ranges, one-line errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from decode_accel.errors import DecodeAccelError
from decode_accel.inference.movie import ArrayMovie, open_movie, parse_frames


@pytest.fixture
def stack():
    rng = np.random.default_rng(0)
    return rng.integers(90, 4000, size=(7, 16, 20), dtype=np.uint16)


def test_plain_stack_is_memory_mapped_and_reads_the_frames_asked_for(tmp_path, stack):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, stack)
    with open_movie(path) as movie:
        assert movie.shape == (7, 1, 16, 20)
        assert movie.dtype == np.uint16
        assert movie.memory_mapped
        np.testing.assert_array_equal(movie.read(slice(2, 5))[:, 0], stack[2:5])
        np.testing.assert_array_equal(movie.read([6, 0])[:, 0], stack[[6, 0]])


def test_compressed_stack_is_read_page_by_page_with_the_same_values(tmp_path, stack):
    path = tmp_path / "zlib.tif"
    tifffile.imwrite(path, stack, compression="zlib")
    movie = open_movie(path)
    assert not movie.memory_mapped
    np.testing.assert_array_equal(movie.read(slice(None))[:, 0], stack)
    np.testing.assert_array_equal(movie.read(slice(3, 4))[:, 0], stack[3:4])


def test_reading_two_frames_of_a_large_movie_does_not_load_the_whole_file(tmp_path):
    frames = np.random.default_rng(1).integers(0, 60000, size=(400, 64, 64), dtype=np.uint16)  # 3.3 MB
    for name, kwargs in (("mm.tif", {}), ("paged.tif", {"compression": "zlib"})):
        path = tmp_path / name
        tifffile.imwrite(path, frames, **kwargs)
        movie = open_movie(path)
        tracemalloc.start()
        got = movie.read(slice(200, 202))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        np.testing.assert_array_equal(got[:, 0], frames[200:202])
        assert peak < frames.nbytes / 20, f"{name}: reading 2 of 400 frames allocated {peak} bytes"
        movie.close()


def test_imagej_hyperstack_channel_axis_gives_two_channels_and_pixel_size(tmp_path):
    data = np.random.default_rng(2).integers(0, 1000, size=(5, 2, 16, 24), dtype=np.uint16)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX", "unit": "um"}, resolution=(1 / 0.16, 1 / 0.16))
    movie = open_movie(path)
    assert movie.shape == (5, 2, 16, 24)
    assert movie.px_size_nm == pytest.approx(160.0)
    np.testing.assert_array_equal(movie.read(slice(1, 3)), data[1:3])


def test_ome_tiff_channel_axis_and_physical_pixel_size(tmp_path):
    data = np.random.default_rng(3).integers(0, 1000, size=(4, 2, 16, 16), dtype=np.uint16)
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1})
    movie = open_movie(path)
    assert movie.shape == (4, 2, 16, 16)
    assert movie.px_size_nm == pytest.approx(100.0)
    np.testing.assert_array_equal(movie.read([3]), data[3:4])


def test_two_files_are_the_two_channels_in_order(tmp_path, stack):
    a, b = tmp_path / "ch1.tif", tmp_path / "ch2.tif"
    tifffile.imwrite(a, stack)
    tifffile.imwrite(b, stack[::-1].copy(), compression="zlib")
    movie = open_movie([a, b])
    assert movie.shape == (7, 2, 16, 20)
    got = movie.read(slice(0, 7))
    np.testing.assert_array_equal(got[:, 0], stack)
    np.testing.assert_array_equal(got[:, 1], stack[::-1])


def test_channel_files_of_different_length_are_refused(tmp_path, stack):
    a, b = tmp_path / "ch1.tif", tmp_path / "ch2.tif"
    tifffile.imwrite(a, stack)
    tifffile.imwrite(b, stack[:5])
    with pytest.raises(DecodeAccelError, match="ch2.tif: shape: channel files differ"):
        open_movie([a, b])


def test_frame_ranges_parse_like_python_slices():
    assert parse_frames("2:5", 10) == slice(2, 5)
    assert parse_frames(":4", 10) == slice(0, 4)
    assert parse_frames("7:", 10) == slice(7, 10)
    assert parse_frames("5:100", 10) == slice(5, 10)
    assert parse_frames(None, 10) == slice(0, 10)
    assert parse_frames((1, 3), 10) == slice(1, 3)
    with pytest.raises(DecodeAccelError, match="--frames: cannot read frame range"):
        parse_frames("1-5", 10)
    with pytest.raises(DecodeAccelError, match="selects no frame"):
        parse_frames("12:20", 10)


def test_missing_file_gives_one_line_error(tmp_path):
    with pytest.raises(DecodeAccelError) as err:
        open_movie(tmp_path / "nope.tif")
    assert "nope.tif: file not found" in str(err.value) and "\n" not in str(err.value)


def test_a_text_file_is_not_a_tiff(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("hello")
    with pytest.raises(DecodeAccelError, match="notes.tif: not a readable TIFF") as err:
        open_movie(path)
    assert "\n" not in str(err.value)


def test_a_truncated_file_names_the_unreadable_frame(tmp_path, stack):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, stack)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    movie = open_movie(path)
    with pytest.raises(DecodeAccelError, match=r"cut.tif: frame \d+ .*cannot be read") as err:
        movie.read(slice(0, movie.n_frames))
    assert "\n" not in str(err.value)


def test_channel_count_and_pixel_size_are_checked_against_the_model(tmp_path, stack):
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"unit": "um"}, resolution=(10.0, 10.0))  # 100 nm
    movie = open_movie(path)
    movie.check(n_channels=1, px_size_nm=100.0)
    with pytest.raises(DecodeAccelError, match="channels: movie has 1 channel.* expects 2"):
        movie.check(n_channels=2)
    with pytest.raises(DecodeAccelError, match="pixel size: .*100 nm .* trained at 160 nm"):
        movie.check(px_size_nm=160.0)


def test_array_movie_accepts_frames_without_a_channel_axis(stack):
    movie = ArrayMovie(stack)
    assert movie.shape == (7, 1, 16, 20)
    np.testing.assert_array_equal(movie.read(slice(1, 2))[0, 0], stack[1])


def _ome_xml(own_uuid: str, files: list[tuple[str, str, int, int]], n_frames: int, size: int) -> str:
    parts = "".join(f'<TiffData FirstT="{first}" IFD="0" PlaneCount="{count}"><UUID FileName="{name}">urn:uuid:{uuid}'
                    f"</UUID></TiffData>" for name, uuid, first, count in files)
    return ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
            f'UUID="urn:uuid:{own_uuid}"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
            f'Type="uint16" SizeX="{size}" SizeY="{size}" SizeC="1" SizeZ="1" SizeT="{n_frames}" PhysicalSizeX="0.1" '
            f'PhysicalSizeY="0.1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>{parts}</Pixels></Image></OME>')


def test_micro_manager_stack_split_over_two_files_reads_as_one_movie(tmp_path):
    # Micro-Manager splits long acquisitions into *_MMStack_Pos0.ome.tif, *_MMStack_Pos0_1.ome.tif, ...
    # whose OME-XML lists the planes of every file.
    data = np.random.default_rng(4).integers(0, 5000, size=(6, 16, 16), dtype=np.uint16)
    files = [("a_MMStack_Pos0.ome.tif", "11111111-1111-1111-1111-111111111111", 0, 3),
             ("a_MMStack_Pos0_1.ome.tif", "22222222-2222-2222-2222-222222222222", 3, 3)]
    for name, uuid, first, count in files:
        tifffile.imwrite(tmp_path / name, data[first:first + count], description=_ome_xml(uuid, files, 6, 16),
                         metadata=None, photometric="minisblack")
    with open_movie(tmp_path / files[0][0]) as movie:
        assert movie.shape == (6, 1, 16, 16)
        assert movie.px_size_nm == pytest.approx(100.0)
        np.testing.assert_array_equal(movie.read(slice(2, 5))[:, 0], data[2:5])  # across the file boundary
