"""The ascend platform: Huawei Ascend NPUs through torch_npu and HCCL."""
