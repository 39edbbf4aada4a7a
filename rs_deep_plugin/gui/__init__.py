"""RS Deep's QGIS GUI: the dock panel and the dependency installer dialog."""
