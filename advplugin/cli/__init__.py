"""advplugin.cli."""
