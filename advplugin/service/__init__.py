"""advplugin.service."""
