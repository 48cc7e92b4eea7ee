//! Read planner and load pipeline: storage -> staging -> host memory or GPU
