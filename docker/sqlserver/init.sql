-- Demo source for the SQL Server override: CDC on database cdc_demo and table dbo.customers.
-- Idempotent: safe to run on every `up`.
IF DB_ID(N'cdc_demo') IS NULL
    CREATE DATABASE cdc_demo;
GO

USE cdc_demo;
GO

IF NOT EXISTS (SELECT 1 FROM sys.databases WHERE name = N'cdc_demo' AND is_cdc_enabled = 1)
    EXEC sys.sp_cdc_enable_db;
GO

IF OBJECT_ID(N'dbo.customers', N'U') IS NULL
BEGIN
    CREATE TABLE dbo.customers (
        id         BIGINT IDENTITY(1, 1) PRIMARY KEY,
        name       NVARCHAR(200) NOT NULL,
        email      NVARCHAR(320) NOT NULL UNIQUE,
        created_at DATETIME2     NOT NULL DEFAULT SYSUTCDATETIME()
    );
    INSERT INTO dbo.customers (name, email)
    VALUES (N'Ada Lovelace', N'ada@example.com'), (N'Grace Hopper', N'grace@example.com');
END
GO

IF NOT EXISTS (
    SELECT 1 FROM sys.tables WHERE name = N'customers' AND is_tracked_by_cdc = 1
)
    EXEC sys.sp_cdc_enable_table
        @source_schema = N'dbo',
        @source_name = N'customers',
        @role_name = NULL,
        @supports_net_changes = 1;
GO
