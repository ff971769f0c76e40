"""leukoscope collector: the lab's side of MQTT. Every device's results into one database, per-sample reports.

Research and screening aid, not a diagnostic device. It imports neither TensorFlow nor OpenCV: it runs
on a lab server or a workstation that has neither, and only reads the payload schemas of ``edge``.
"""
