"""The clinical network on one machine: Orthanc (PACS) with Lua auto-routing, the AI listener,
the OHIF viewer behind a same-origin DICOMweb proxy, started and stopped as plain processes.

``python -m hippo.network up|down|status``; ``python -m hippo.listen`` runs the listener alone.
"""
