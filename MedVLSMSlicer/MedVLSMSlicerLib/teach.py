"""Teach: from the radiologist's segmentations in the scene to a new model folder, in the background.

Qt-free: the Teach section's controller (``teach_panel.py``) and tests drive it with the scene.
Reading the segmentations and drawing the learning curve touch MRML, so they run on the calling (GUI)
thread; the worker thread sees numpy copies only. The training itself is ``medvlsm.teaching`` (the
server and the command line run the same): partial labels, held-out slices, a folder that appears
only when complete.

- **Data**: each chosen segmentation over its volume (its reference geometry, which the Segment
  Editor sets to the source volume); segment names are the prompts.
- **Result**: ``<models folder>/<base>-taught-<N>`` (a new N each time); on a server, that client's
  model there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvlsm.errors import InputError
from medvlsm.teaching import Hooks, LabelledArrays, TeachSettings, in_memory, teach_model, versioned_folder

from . import mrml_glue as glue
from .session import Job


def default_models_folder() -> Path:
    """Where taught models go unless the user chooses: ``~/MedVLSM models``, beside the user's data
    rather than inside Slicer's install (an update would remove it)."""
    return Path.home() / "MedVLSM models"


def folder_cases(folder) -> list:
    """A folder of labelled cases (``volumes/`` + ``segmentations/`` named alike, as the command line
    reads them): the pairs are found now, their files read by the worker."""
    from medvlsm.datasets import read_volume_folder

    folder = Path(folder).expanduser()
    if not (folder / "volumes").is_dir() or not (folder / "segmentations").is_dir():
        raise InputError(f"{folder} has no volumes/ and segmentations/ folders",
                         "Give a folder holding volumes/case1.nii.gz and segmentations/case1.seg.nrrd")
    return read_volume_folder(folder / "volumes", folder / "segmentations")


def scene_cases(segmentation_nodes, allow_none: bool = False) -> list[LabelledArrays]:
    """The chosen segmentations -> cases (GUI thread). Each must lie over a volume and hold a segment."""
    cases = []
    for node in segmentation_nodes:
        volume_node = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"Segmentation '{node.GetName()}' is not drawn over a volume",
                             "Create it in the Segment Editor with its volume as source")
        segmentation = node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if not ids:
            raise InputError(f"Segmentation '{node.GetName()}' has no segments", "Label a structure first")
        masks = np.stack([glue.read_segment(node, sid, volume_node) for sid in ids])
        names = [segmentation.GetSegment(sid).GetName() for sid in ids]
        cases.append(LabelledArrays(node.GetName(), glue.volume_from_node(volume_node), masks, names))
    if not cases and not allow_none:
        raise InputError("No segmentation chosen to teach on", "Tick at least one segmentation under Teach")
    return cases


class TeachJob(Job):
    """A teach on a worker thread: ``curve`` grows by one row per epoch (epoch, train loss, held-out
    loss and Dice); ``result`` is ``(model folder or server model name, summary)``."""

    def __init__(self, target):
        self.curve: list = []  # set before the worker starts: it appends to this list
        self.base_untrained = False
        super().__init__(target)

    def step(self, done, total):
        self.progress = (done, total)


def teach(cases: list, base_model: str, settings: TeachSettings, models_folder="") -> TeachJob:
    """Teach on this computer. Cancel: no folder."""
    settings.check()
    if not base_model:
        raise InputError("No model to teach", "Choose a model under Model first")

    def work(job: TeachJob):
        from medvlsm.models import load_model

        job.phase = "Teaching: loading the model..."
        model = load_model(base_model)
        job.base_untrained = not model.spec.trained
        folder = versioned_folder(models_folder or default_models_folder(), base_model)
        job.phase = f"Teaching ({settings.mode}): cutting the labelled slices, encoding them..."
        summary = teach_model(model, cases, settings, folder,
                              Hooks(job.step, job.curve.append, lambda: job.cancelled))
        return folder, summary

    return TeachJob(work)


def teach_on_server(cases: list, base_model: str, settings: TeachSettings, client) -> TeachJob:
    """Teach on a ``medvlsm serve`` server (``client``: ``medvlsm.client.Client``); the result's model
    is that server's model name, for this client only."""
    settings.check()

    def work(job: TeachJob):
        job.phase = "Teaching on the server: uploading the cases..."
        name, summary = client.teach(in_memory(cases), settings, base_model or None, progress=job.step,
                                     on_epoch=job.curve.append, cancel=lambda: job.cancelled)
        job.base_untrained = not summary.get("base_trained", True)
        return name, summary

    return TeachJob(work)


class LearningCurve:
    """The curve as Slicer draws it: a table node (epoch, train loss, held-out Dice), two plot series
    and a chart. ``update`` on the GUI thread; ``remove`` takes every node out again (Cancel)."""

    COLUMNS = ("epoch", "train loss", "held-out Dice")

    def __init__(self, scene, name: str):
        import vtk

        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} learning curve")
        for column in self.COLUMNS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.series = []
        for column, color in zip(self.COLUMNS[1:], ((0.9, 0.5, 0.1), (0.1, 0.5, 0.9))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {column}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetColor(*color)
            self.series.append(series)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} learning curve")
        self.chart.SetTitle(f"Teaching {name}")
        self.chart.SetXAxisTitle("epoch")
        self.chart.SetYAxisTitle("loss / Dice")
        for series in self.series:
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())

    def update(self, rows: list) -> None:
        table = self.table.GetTable()
        if table.GetNumberOfRows() == len(rows):
            return
        table.SetNumberOfRows(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate((row["epoch"], row["train_loss"], row["val_dice"])):
                table.SetValue(r, c, float(value))
        table.Modified()
        self.table.Modified()

    def remove(self) -> None:
        glue.remove_if_present(self.scene, [self.chart, *self.series, self.table])
