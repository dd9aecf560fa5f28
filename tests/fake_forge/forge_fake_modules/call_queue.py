import threading

queue_lock = threading.Lock()
