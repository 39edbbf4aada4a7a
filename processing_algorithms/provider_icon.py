"""Path of the plugin's icon."""
import os

ICON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources", "icon.svg")
