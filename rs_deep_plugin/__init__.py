"""RS Deep: QGIS glue, GUI and the QGIS-free engine (rs_deep_plugin.engine)."""
