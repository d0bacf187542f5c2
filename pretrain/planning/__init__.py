"""Before launching: parameters, FLOPs, time and memory per GPU, the start-up memory check, the hardware."""
