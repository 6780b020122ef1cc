module watchgate.dev/plugins/go-json-guard

go 1.26

require watchgate.dev/sdk v0.0.0

replace watchgate.dev/sdk => ../../plugin-sdk/go
