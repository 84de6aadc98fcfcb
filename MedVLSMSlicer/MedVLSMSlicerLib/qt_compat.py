"""The only place that knows whether we run under Slicer's PythonQt (``qt``) or PySide6 (Qt.py).

The panel controller asks this module for widget classes, a timer and the .ui loader, so the same
controller runs inside Slicer and in the offscreen Qt tests.
"""

from __future__ import annotations

try:  # inside 3D Slicer
    import qt as _qt  # noqa: F401

    IN_SLICER = True
except ImportError:
    IN_SLICER = False


def QtWidgets():
    if IN_SLICER:
        import qt

        return qt
    from Qt import QtWidgets as widgets

    return widgets


def QtCore():
    if IN_SLICER:
        import qt

        return qt
    from Qt import QtCore as core

    return core


def load_ui(path):
    if IN_SLICER:
        import slicer

        return slicer.util.loadUI(str(path))
    from Qt import QtCompat

    return QtCompat.loadUi(str(path))


def children_by_name(root) -> dict:
    """objectName -> widget, for every named child of ``root``. (Widget state is read with
    ``widget.property(name)``, which PythonQt and PySide6 both offer, unlike their accessors.)"""
    return {w.property("objectName"): w for w in root.findChildren(QtWidgets().QWidget)}


def timer(interval_ms: int, callback):
    t = QtCore().QTimer()
    t.setInterval(interval_ms)
    t.timeout.connect(callback)
    return t


def item_text(item) -> str:
    """QListWidgetItem is no QObject (no ``property``): PythonQt exposes text as a property."""
    return item.text() if callable(getattr(item, "text", None)) else item.text


def add_checkable_item(list_widget, text: str, checked: bool = False) -> None:
    core = QtCore()
    item = QtWidgets().QListWidgetItem(text)
    item.setFlags(item.flags() | core.Qt.ItemIsUserCheckable)
    item.setCheckState(core.Qt.Checked if checked else core.Qt.Unchecked)
    list_widget.addItem(item)


def item_checked(item) -> bool:
    return item.checkState() == QtCore().Qt.Checked
