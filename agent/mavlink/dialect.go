// The dialect: a hand-written subset of MAVLink's "common" dialect, only
// the messages the agent reads or sends, so that nothing else is linked.
// Struct and field names must match the XML names (CamelCase of the snake_case
// XML name) because gomavlib derives CRC_EXTRA from them; base fields must be
// in XML declaration order, extension fields last with `mavext:"true"`.
// TestCRCExtraMatchesCommon checks every one against gomavlib's common.

package mavlink

import (
	"github.com/bluenviron/gomavlib/v3/pkg/dialect"
	"github.com/bluenviron/gomavlib/v3/pkg/message"
)

// Enum-typed fields only need a uint64 kind plus a `mavenum` wire-type tag.
type (
	MAV_TYPE      uint64
	MAV_AUTOPILOT uint64
	MAV_MODE_FLAG uint64
	MAV_STATE     uint64
	MAV_CMD       uint64
	MAV_RESULT    uint64
	MAV_SEVERITY  uint64
)

const (
	MAV_TYPE_GCS                 MAV_TYPE      = 6
	MAV_TYPE_ONBOARD_CONTROLLER  MAV_TYPE      = 18
	MAV_AUTOPILOT_INVALID        MAV_AUTOPILOT = 8
	MAV_STATE_ACTIVE             MAV_STATE     = 4
	MAV_MODE_FLAG_SAFETY_ARMED   MAV_MODE_FLAG = 128
	MAV_CMD_REQUEST_MESSAGE      MAV_CMD       = 512
	MAV_COMP_ID_ONBOARD_COMPUTER               = 191

	// MAV_LANDED_STATE
	LandedUndefined = 0
	LandedOnGround  = 1
	LandedInAir     = 2
	LandedTakeoff   = 3
	LandedLanding   = 4

	// MAV_SEVERITY: 0 emergency ... 4 warning ... 7 debug
	SeverityWarning MAV_SEVERITY = 4

	// MsgAutopilotVersion is AUTOPILOT_VERSION's id, which the agent
	// requests.
	MsgAutopilotVersion = 148
)

type MessageHeartbeat struct {
	Type           MAV_TYPE      `mavenum:"uint8"`
	Autopilot      MAV_AUTOPILOT `mavenum:"uint8"`
	BaseMode       MAV_MODE_FLAG `mavenum:"uint8"`
	CustomMode     uint32
	SystemStatus   MAV_STATE `mavenum:"uint8"`
	MavlinkVersion uint8
}

func (*MessageHeartbeat) GetID() uint32 { return 0 }

type MessageSysStatus struct {
	OnboardControlSensorsPresent         uint64 `mavenum:"uint32"`
	OnboardControlSensorsEnabled         uint64 `mavenum:"uint32"`
	OnboardControlSensorsHealth          uint64 `mavenum:"uint32"`
	Load                                 uint16
	VoltageBattery                       uint16
	CurrentBattery                       int16
	BatteryRemaining                     int8
	DropRateComm                         uint16
	ErrorsComm                           uint16
	ErrorsCount1                         uint16
	ErrorsCount2                         uint16
	ErrorsCount3                         uint16
	ErrorsCount4                         uint16
	OnboardControlSensorsPresentExtended uint64 `mavenum:"uint32" mavext:"true"`
	OnboardControlSensorsEnabledExtended uint64 `mavenum:"uint32" mavext:"true"`
	OnboardControlSensorsHealthExtended  uint64 `mavenum:"uint32" mavext:"true"`
}

func (*MessageSysStatus) GetID() uint32 { return 1 }

type MessageGpsRawInt struct {
	TimeUsec          uint64
	FixType           uint64 `mavenum:"uint8"`
	Lat               int32
	Lon               int32
	Alt               int32
	Eph               uint16
	Epv               uint16
	Vel               uint16
	Cog               uint16
	SatellitesVisible uint8
	AltEllipsoid      int32  `mavext:"true"`
	HAcc              uint32 `mavext:"true"`
	VAcc              uint32 `mavext:"true"`
	VelAcc            uint32 `mavext:"true"`
	HdgAcc            uint32 `mavext:"true"`
	Yaw               uint16 `mavext:"true"`
}

func (*MessageGpsRawInt) GetID() uint32 { return 24 }

type MessageGlobalPositionInt struct {
	TimeBootMs  uint32
	Lat         int32
	Lon         int32
	Alt         int32
	RelativeAlt int32
	Vx          int16
	Vy          int16
	Vz          int16
	Hdg         uint16
}

func (*MessageGlobalPositionInt) GetID() uint32 { return 33 }

type MessageCommandLong struct {
	TargetSystem    uint8
	TargetComponent uint8
	Command         MAV_CMD `mavenum:"uint16"`
	Confirmation    uint8
	Param1          float32
	Param2          float32
	Param3          float32
	Param4          float32
	Param5          float32
	Param6          float32
	Param7          float32
}

func (*MessageCommandLong) GetID() uint32 { return 76 }

type MessageCommandAck struct {
	Command         MAV_CMD    `mavenum:"uint16"`
	Result          MAV_RESULT `mavenum:"uint8"`
	Progress        uint8      `mavext:"true"`
	ResultParam2    int32      `mavext:"true"`
	TargetSystem    uint8      `mavext:"true"`
	TargetComponent uint8      `mavext:"true"`
}

func (*MessageCommandAck) GetID() uint32 { return 77 }

type MessageBatteryStatus struct {
	Id               uint8
	BatteryFunction  uint64 `mavenum:"uint8"`
	Type             uint64 `mavenum:"uint8"`
	Temperature      int16
	Voltages         [10]uint16
	CurrentBattery   int16
	CurrentConsumed  int32
	EnergyConsumed   int32
	BatteryRemaining int8
	TimeRemaining    int32     `mavext:"true"`
	ChargeState      uint64    `mavenum:"uint8" mavext:"true"`
	VoltagesExt      [4]uint16 `mavext:"true"`
	Mode             uint64    `mavenum:"uint8" mavext:"true"`
	FaultBitmask     uint64    `mavenum:"uint32" mavext:"true"`
}

func (*MessageBatteryStatus) GetID() uint32 { return 147 }

type MessageAutopilotVersion struct {
	Capabilities            uint64 `mavenum:"uint64"`
	FlightSwVersion         uint32
	MiddlewareSwVersion     uint32
	OsSwVersion             uint32
	BoardVersion            uint32
	FlightCustomVersion     [8]uint8
	MiddlewareCustomVersion [8]uint8
	OsCustomVersion         [8]uint8
	VendorId                uint16
	ProductId               uint16
	Uid                     uint64
	Uid2                    [18]uint8 `mavext:"true"`
}

func (*MessageAutopilotVersion) GetID() uint32 { return 148 }

type MessageExtendedSysState struct {
	VtolState   uint64 `mavenum:"uint8"`
	LandedState uint64 `mavenum:"uint8"`
}

func (*MessageExtendedSysState) GetID() uint32 { return 245 }

type MessageStatustext struct {
	Severity MAV_SEVERITY `mavenum:"uint8"`
	Text     string       `mavlen:"50"`
	Id       uint16       `mavext:"true"`
	ChunkSeq uint8        `mavext:"true"`
}

func (*MessageStatustext) GetID() uint32 { return 253 }

// Dialect holds only the messages the agent reads or sends.
var Dialect = &dialect.Dialect{
	Version: 3,
	Messages: []message.Message{
		&MessageHeartbeat{},
		&MessageSysStatus{},
		&MessageGpsRawInt{},
		&MessageGlobalPositionInt{},
		&MessageCommandLong{},
		&MessageCommandAck{},
		&MessageBatteryStatus{},
		&MessageAutopilotVersion{},
		&MessageExtendedSysState{},
		&MessageStatustext{},
	},
}
