module watchgate.dev/sdk

go 1.26
