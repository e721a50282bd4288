"""What a person watches: the monitor (snapshots of load per rank, the seed-format log lines;
:mod:`~nbkit.ui.monitor`) and the ipywidgets panel (:mod:`~nbkit.ui.panel`). Both only read
snapshots and send commands to the Cluster."""
