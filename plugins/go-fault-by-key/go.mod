module watchgate.dev/plugins/go-fault-by-key

go 1.26

require watchgate.dev/sdk v0.0.0

replace watchgate.dev/sdk => ../../plugin-sdk/go
