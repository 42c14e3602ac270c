"""The reference's documented examples (Cellpose's docs page "Distributed Cellpose for larger-than-memory
data"), run as written after changing only the import line ``from cellpose.contrib.distributed_segmentation
import ...`` to ``from mpicellpose import ...``; the model is the shipped ``demo`` (Cellpose's weights cannot
be downloaded here), the paths are local, the sizes are scaled to a 2-core machine (a 256^3 block becomes
32^3) and the diameter is the demo model's 16.  Each example's own words are kept: ``gpu: True``,
``z_axis``, ``channels``, ``do_3D``, ``cluster_kwargs`` of a workstation, of LSF and of SLURM,
``filname_pattern``, a crop "as the distributed function would" define it with a dummy block index."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from mpicellpose.synthetic.metrics import match_objects
from mpicellpose.synthetic.nuclei import make_nuclei

pytestmark = pytest.mark.cellpose
tifffile = pytest.importorskip("tifffile")

SHAPE, BLOCK = (32, 64, 64), (32, 32, 32)
model_kwargs = {"gpu": True, "pretrained_model": "demo"}  # the page: {'gpu': True, 'model_type': 'cyto3'}
eval_kwargs = {"diameter": 16, "z_axis": 0, "channels": [0, 0], "do_3D": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference_examples")
    img, truth = make_nuclei(SHAPE, seed=11, touching_fraction=0.3)
    tifffile.imwrite(d / "image.tiff", img)
    return d, img, truth


@pytest.fixture(scope="module")
def large_zarr_array(data):
    """Example 'Convert a single large tiff image to a zarr array', as written."""
    d = data[0]
    from mpicellpose import numpy_array_to_zarr

    data_numpy = tifffile.imread(str(d / "image.tiff"))
    data_zarr = numpy_array_to_zarr(str(d / "output.zarr"), data_numpy, chunks=(32, 32, 32))
    del data_numpy
    assert data_zarr.shape == SHAPE and np.array_equal(data_zarr[...], data[1])
    return data_zarr


def _workstation(data, large_zarr_array, out):
    """Example 'Run distributed Cellpose on half the resources of a workstation'."""
    from mpicellpose import distributed_eval

    cluster_kwargs = {"n_workers": 1, "ncpus": 8, "memory_limit": "64GB", "threads_per_worker": 1}
    segments, boxes = distributed_eval(
        input_zarr=large_zarr_array,
        blocksize=BLOCK,
        write_path=str(data[0] / out),
        model_kwargs=model_kwargs,
        eval_kwargs=eval_kwargs,
        cluster_kwargs=cluster_kwargs,
    )
    return segments, boxes


@pytest.fixture(scope="module")
def workstation(data, large_zarr_array):
    return _workstation(data, large_zarr_array, "workstation.zarr")


def test_workstation_example(data, workstation):
    segments, boxes = workstation
    lab = segments[...]
    assert len(boxes) == lab.max() > 0
    assert match_objects(lab, data[2], 0.5)["f1"] >= 0.9


def test_one_block_example(data, large_zarr_array):
    """Example 'Test run a single block before distributing the whole dataset': a crop around any point."""
    from mpicellpose import process_block

    starts = (8, 24, 16)
    blocksize = (24, 32, 32)
    overlap = 8
    crop = tuple(slice(s - overlap, s + b + overlap) for s, b in zip(starts, blocksize))
    crop = tuple(slice(max(c.start, 0), min(c.stop, n)) for c, n in zip(crop, SHAPE))  # this volume is small
    segments, boxes, box_ids = process_block(
        block_index=(0, 0, 0),  # when test_mode=True this is just a dummy value
        crop=crop,
        input_zarr=large_zarr_array,
        model_kwargs=model_kwargs,
        eval_kwargs=eval_kwargs,
        blocksize=blocksize,
        overlap=overlap,
        output_zarr=None,
        test_mode=True,
    )
    # the crop less its overlap where it is not at the volume's start, one block long at most
    core = tuple(slice(c.start + (overlap if c.start else 0), min(c.stop, c.start + (overlap if c.start else 0) + b))
                 for c, b in zip((slice(max(s - overlap, 0), s + b + overlap) for s, b in zip(starts, blocksize)),
                                 blocksize))
    assert segments.shape == tuple(c.stop - c.start for c in core)
    assert len(boxes) == len(box_ids) == segments.max() > 0
    assert match_objects(segments, data[2][core], 0.5)["f1"] >= 0.8


def test_folder_of_tiffs_example(data):
    """Example 'Wrap a folder of tiff images/tiles into a single zarr array', with the page's spelling
    ``filname_pattern``, then segmented like the workstation example."""
    from mpicellpose import distributed_eval, wrap_folder_of_tiffs

    d, img, truth = data
    tiles = d / "tiles"
    tiles.mkdir()
    for z in range(2):
        for y in range(2):
            for x in range(2):
                tile = img[z * 16:(z + 1) * 16, y * 32:(y + 1) * 32, x * 32:(x + 1) * 32]
                tifffile.imwrite(tiles / f"tile_Z{z}Y{y}X{x}.tiff", tile)
    reconstructed_virtual_zarr_array = wrap_folder_of_tiffs(
        filname_pattern=str(tiles / "*.tiff"),
        block_index_pattern=r"_(Z)(\d+)(Y)(\d+)(X)(\d+)",
    )
    assert np.array_equal(reconstructed_virtual_zarr_array[...], img)
    segments, boxes = distributed_eval(input_zarr=reconstructed_virtual_zarr_array, blocksize=BLOCK,
                                       write_path=str(d / "tiles_out.zarr"), model_kwargs=model_kwargs,
                                       eval_kwargs=eval_kwargs)
    assert match_objects(segments[...], truth, 0.5)["f1"] >= 0.9


@pytest.mark.parametrize("cluster", ["lsf", "slurm"])
def test_cluster_examples_run_on_the_ranks_there_are(data, large_zarr_array, workstation, cluster, caplog):
    """Examples 'on an LSF cluster with 128 GPUs' and 'on a SLURM cluster': their cluster_kwargs mean
    nothing under MPI; one line says so (and how to get ranks), the run uses the ranks it was started on."""
    from mpicellpose import distributed_eval

    cluster_kwargs = {
        "lsf": {"ncpus": 2, "min_workers": 8, "max_workers": 128, "queue": "gpu_l4",
                "job_extra_directives": ['-gpu "num=1"']},
        "slurm": {"cluster_type": "slurm", "ncpus": 18, "min_workers": 1, "max_workers": 4, "walltime": "24:00:00",
                  "memory": "125GB", "job_extra_directives": ["--constraint=gpu", "--gres=gpu:a100:1"]},
    }[cluster]
    with caplog.at_level("WARNING", logger="mpicellpose"):
        segments, boxes = distributed_eval(
            input_zarr=large_zarr_array,
            blocksize=BLOCK,
            write_path=str(data[0] / f"{cluster}.zarr"),
            model_kwargs=model_kwargs,
            eval_kwargs=eval_kwargs,
            cluster_kwargs=cluster_kwargs,
        )
    said = [r.getMessage() for r in caplog.records if "Dask cluster" in r.getMessage()]
    assert len(said) == 1 and "mpirun -n N" in said[0] and "job_extra_directives" in said[0]
    # the same labels as the workstation example: the cluster settings change nothing
    same = workstation[0][...]
    assert np.array_equal(segments[...], same) and len(boxes) == same.max()


def test_preprocessing_and_mask_example(data, large_zarr_array):
    """Example 'Use preprocessing_steps and a mask' (a Gaussian, a background subtracted through the crop)."""
    from scipy.ndimage import gaussian_filter

    from mpicellpose import distributed_eval

    background_channel_zarr = zarr.open(str(data[0] / "background.zarr"), mode="w", shape=SHAPE, chunks=BLOCK,
                                        dtype=large_zarr_array.dtype)
    background_channel_zarr[...] = 0
    mask = np.ones((SHAPE[0] // 8, SHAPE[1] // 8, SHAPE[2] // 8), bool)
    mask[:, :, SHAPE[2] // 16:] = False  # the right half of the volume is background (at an 8x lower resolution)

    def pp_step_one(image, sigma, crop):
        return gaussian_filter(image, sigma)

    def pp_step_two(image, crop):
        return image - background_channel_zarr[crop]

    preprocessing_steps = [(pp_step_one, {"sigma": 1.0}), (pp_step_two, {})]
    segments, boxes = distributed_eval(
        input_zarr=large_zarr_array,
        blocksize=BLOCK,
        write_path=str(data[0] / "pp.zarr"),
        preprocessing_steps=preprocessing_steps,
        mask=mask,
        model_kwargs=model_kwargs,
        eval_kwargs=eval_kwargs,
    )
    lab = segments[...]
    assert lab.max() > 0 and not lab[:, :, 32:].any()  # blocks without foreground stay 0
